"""Tiny transformers models built from configs (nothing downloaded), shared by the family tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Import into a test module (it is autouse there): these models are tiny, so one intra-op thread is
    fastest and does not oversubscribe a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(hidden: int = 32, intermediate: int = 48, vocab: int = 64, layers: int = 2, seed: int = 0, **config):
    """A seeded LlamaForCausalLM of 4 heads (2 KV heads); config: more LlamaConfig fields (attention_bias=True)."""
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, **config)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(hidden: int = 32, vocab: int = 64, layers: int = 2, seed: int = 0):
    """A seeded GPT2LMHeadModel (its linear layers are transformers' Conv1D, weight stored (in, out))."""
    import transformers
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=32,
                                  bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)     # no dropout of its own: two copies train alike
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def load_4bit(d, compute_dtype=torch.float32):
    """The model saved in directory d, loaded by transformers in 4 bits (NF4, double quantization) on the
    CPU; skips the test where this bitsandbytes cannot."""
    import transformers
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(d, quantization_config=cfg, device_map="cpu")
    except Exception as e:  # noqa: BLE001 - a bitsandbytes without this device's 4-bit kernels
        pytest.skip(f"transformers cannot load a 4-bit model here: {e}")


def train_losses(rep, model, ids, steps: int) -> list[float]:
    """The losses of `steps` training steps of a patched model (fusedtune.patch's report) on one batch."""
    return [float(rep.step(lambda: model(ids, labels=ids).loss)) for _ in range(steps)]


def adamw_losses(model, ids, steps: int, lr: float = 1e-3) -> list[float]:
    """The losses of `steps` plain AdamW steps of a causal LM on one batch (labels = ids)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def train_steps(model, opt, ids, steps: int) -> None:
    """`steps` optimizer steps of a causal LM on one batch (labels = ids)."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def moment_bytes(opt) -> int:
    """Bytes of an optimizer's state tensors except the step counters (AdamW: exp_avg + exp_avg_sq)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if torch.is_tensor(v) and k != "step")
