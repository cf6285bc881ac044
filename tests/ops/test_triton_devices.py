"""Kernels run on the GPU that holds their tensors, whichever device is current (Triton launches on the current
one). The rule is checked here with a stand-in for torch.cuda; the real thing needs two GPUs."""

import warnings

import pytest
import torch

from helpers import tiny_model
from megalodon.ops import triton as kernels


class Held:
    def __init__(self, device: str):
        self.device = torch.device(device)


@pytest.mark.parametrize("tensor_device, current, switched", [
    ("cuda:1", 0, True), ("cuda:0", 0, False), ("cuda:1", 1, False), ("cpu", 0, False),
])
def test_a_launcher_runs_with_its_inputs_gpu_current(monkeypatch, tensor_device, current, switched):
    entered = []

    class DeviceGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", DeviceGuard)
    launcher = kernels.on_input_device(lambda x, scale, *, shift: (len(entered), scale + shift))
    assert launcher(Held(tensor_device), 2, shift=3) == (int(switched), 5)
    assert entered == ([torch.device(tensor_device)] if switched else [])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_model_on_the_second_gpu_trains_and_decodes_there():
    """cuda:1 while cuda:0 is current: training and the graph-captured decode step agree with the CPU."""
    from megalodon.decode_state import DecodeState
    from megalodon.inference.decoding import StaticDecoder

    assert torch.cuda.current_device() == 0
    cpu = tiny_model(torch.float32).train()
    gpu = tiny_model(torch.float32).train().to("cuda:1")
    ids = torch.randint(0, 64, (2, 40))
    for model, device in ((cpu, "cpu"), (gpu, "cuda:1")):
        model(ids.to(device)).square().mean().backward()
    for mine, theirs in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(mine.grad.cpu(), theirs.grad, rtol=1e-4, atol=1e-5)

    decoders = []
    for model, device in ((cpu.eval(), "cpu"), (gpu.eval(), "cuda:1")):
        with torch.no_grad():
            _, state = model(ids[:, :13].to(device), return_state=True)
        decoders.append(StaticDecoder(model, DecodeState.from_state(state, model.config)))
    assert decoders[1].cuda_graph
    for t in range(13, 20):
        torch.testing.assert_close(decoders[1].step(ids[:, t].to("cuda:1")).cpu(), decoders[0].step(ids[:, t]),
                                   rtol=1e-4, atol=1e-4)



class SeemsOnCuda(torch.Tensor):
    """A CPU tensor that answers is_cuda as a GPU's would: enough for the dispatch rule, which reads only that."""

    @property
    def is_cuda(self) -> bool:
        return True


def test_a_gpu_without_triton_takes_the_pytorch_path_and_says_so_once(monkeypatch):
    monkeypatch.setattr(kernels, "_TRITON_INSTALLED", False)
    kernels._warn_without_triton.cache_clear()
    on_gpu = torch.zeros(2).as_subclass(SeemsOnCuda)
    with pytest.warns(UserWarning, match="triton is not installed: on this GPU .* PyTorch path"):
        assert not kernels.use_triton("cema", on_gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call is silent
        assert not kernels.use_triton("timestep_norm", on_gpu)
        assert not kernels.use_triton("cema", torch.zeros(2))  # a CPU tensor: nothing to say
    kernels._warn_without_triton.cache_clear()
