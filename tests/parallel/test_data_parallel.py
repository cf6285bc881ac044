"""DDP, FSDP2 and the (dp, cp) mesh train exactly like one process at the same global batch (fp32, 3 SGD steps
with momentum, uneven label counts across ranks)."""

import pytest

import dist_tasks

TOL = 1e-5


def check(results):
    for rank, err in enumerate(results):
        assert err["moved"] > 0.05, (rank, err)  # the steps changed the weights, so equal weights mean something
        assert err["loss"] < TOL and err["weights"] < TOL, (rank, err)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_data_parallel_two_ranks(ranks, kind):
    check(ranks().run(dist_tasks.data_parallel_matches_one_process, kind))


def test_mesh_2x2_chunk_and_data_parallel(ranks):
    check(ranks().run(dist_tasks.mesh_2x2_matches_one_process))


def test_bf16_policy_keeps_cema_and_norm_parameters_fp32(ranks):
    for seen in ranks().run(dist_tasks.bf16_policy_keeps_cema_and_norm_fp32):
        assert seen["wz"] == "torch.bfloat16", seen
        assert seen["cema"] == seen["timenorm"] == seen["final_norm"] == "torch.float32", seen
        assert seen["grad"] == "torch.float32", seen  # fp32 gradient reduction and master weights
        assert 3.0 < seen["loss"] < 6.0, seen  # near ln(64) for an untrained model
