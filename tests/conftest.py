"""Test-wide settings. Triton's interpreter must be chosen before any @triton.jit module is imported.

Kernels are exercised explicitly by the kernel tests; everything else runs the torch reference
path (S2FT_KERNELS=torch) so the suite stays fast on 2 CPU cores.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("S2FT_KERNELS", "torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _threads():
    """Restore torch's thread count after each test: the benchmark harness sets it (its tiny config runs on 1
    thread), and a later test comparing an in-process run with a subprocess's would otherwise sum in another order."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny GQA Llama (fp32) + tokenizer folder, loadable like a real checkpoint."""
    from tiny_tokenizer import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), max_position_embeddings=128)


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory):
    """A saved tiny Qwen3-MoE (4 experts of 3-D weights, top 2) + tokenizer folder."""
    from tiny_tokenizer import save_tiny_moe

    return save_tiny_moe(tmp_path_factory.mktemp("tiny_moe"))
