"""Grades phase2_attention/mha_minimal.py, or your rewrite of it: --impl mha_minimal=PATH.

CONTRACT (mha_minimal): one file that defines
    MultiHeadAttention(embed_dim, num_heads)       an nn.Module with four nn.Linear(embed_dim, embed_dim) (with bias)
                                                   named q_proj, k_proj, v_proj, out_proj
    forward(query, key, value, key_padding_mask=None, is_causal=False) -> output (B, L, E)
        batch-first: query (B, L, E), key and value (B, S, E);
        key_padding_mask: bool (B, S), True = padding, never attended (torch's meaning);
        is_causal=True: query l attends keys 0..l only (self-attention, L == S).
It computes the attention itself (no nn.MultiheadAttention, F.multi_head_attention_forward or
F.scaled_dot_product_attention) and keeps any demo behind `if __name__ == "__main__":`. Returning (output, weights)
as torch does is accepted too.

Checked, with nn.MultiheadAttention(batch_first=True)'s weights copied into the four linears: the output and the
gradients (query, key, value, every weight and bias) equal torch's within 1e-5, for self-attention (L = S) and
cross-attention (L != S), without a mask, with a padding mask, causal, and causal with padding. A mismatch is
compared with attention written out with one classic mistake each (no 1/sqrt(head_dim), heads merged without the
transpose, mask polarity, ...) to name yours.
"""

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from grader import fail_with, import_file
from torch import nn

B, L, S, E, H = 2, 5, 7, 16, 4  # L != S for cross-attention; D = E / H = 4, so 1/sqrt(D) != 1/sqrt(E)
D = E // H
TOL = 1e-5
PROJS = ("q_proj", "k_proj", "v_proj", "out_proj")
CASES = [("self", None), ("cross", None), ("self", "padding"), ("cross", "padding"), ("self", "causal"),
         ("self", "causal+padding")]
# Attention written out with one classic mistake each (see `attention`), in the order they are tried.
MISTAKES = {
    "no_scale": "the scores Q Kᵀ are not scaled by 1/sqrt(head_dim): softmax(Q Kᵀ / sqrt(head_dim)) V keeps each "
                "head's dot products (sums of head_dim terms) at variance ~1, so softmax does not saturate",
    "scale_embed_dim": "the scores are divided by sqrt(embed_dim); the scale is 1/sqrt(head_dim), head_dim = "
                       "embed_dim // num_heads: each head's dot product sums head_dim terms",
    "merge_reshape": "heads merged without the transpose: (B, H, L, D) was reshaped straight to (B, L, E), which "
                     "mixes tokens together; transpose(1, 2) to (B, L, H, D) first, then reshape to (B, L, E)",
    "split_view": "heads split without the transpose: (B, L, E) was viewed straight as (B, H, L, D), which mixes "
                  "tokens together; view it as (B, L, H, D), then transpose(1, 2) to (B, H, L, D)",
    "softmax_queries": "softmax over the wrong dimension: each query's weights must sum to 1 over the keys, "
                       "softmax(dim=-1) of the (B, H, L, S) scores, not over the queries (dim=-2)",
    "padding_inverted": "key_padding_mask applied with the wrong polarity: True marks padding, which must NOT be "
                        "attended (torch's meaning); fill -inf where the mask is True",
    "padding_on_queries": "key_padding_mask applied to the queries: it marks padded KEYS, so it broadcasts as "
                          "(B, 1, 1, S) over the (B, H, L, S) scores, not as (B, 1, S, 1)",
    "mask_zero": "masked scores were set to 0 instead of -inf: softmax still gives them weight exp(0); fill -inf",
    "causal_transposed": "the causal mask is transposed: query l must see keys 0..l, so hide the keys above the "
                         "diagonal (triu(1) of an (L, S) ones matrix), not those below it",
    "causal_diagonal": "the causal mask also hides the diagonal: query l must see key l itself (triu(1), not triu(0))",
    "no_out_proj": "out_proj is not applied: after merging the heads, return out_proj(y)",
    "value_from_key": "the values are projected from the key input: v = v_proj(value), k = k_proj(key)",
}
FORBIDDEN = [(F, "multi_head_attention_forward"), (F, "scaled_dot_product_attention"), (nn.MultiheadAttention,
                                                                                         "forward")]


@pytest.fixture(scope="module")
def module(impl_path):
    path = impl_path("mha_minimal")
    try:
        return import_file(path, "mha_minimal")
    except Exception as e:  # fail_with below, outside the handler: one message, no chained traceback
        problem = f"{path}: importing it failed with {type(e).__name__}: {e}"
    fail_with(f'{problem} (keep any demo behind `if __name__ == "__main__":`)')


@pytest.fixture(scope="module")
def pair(module):
    """(the rewrite, nn.MultiheadAttention) with the same weights, in eval mode, both in float32."""
    if not hasattr(module, "MultiHeadAttention"):
        fail_with("the file defines no class MultiHeadAttention")
    torch.manual_seed(0)
    ours = problem = None
    try:
        ours = module.MultiHeadAttention(E, H)
    except Exception as e:
        problem = f"MultiHeadAttention({E}, {H}) raised {type(e).__name__}: {e}"
    if problem:
        fail_with(f"{problem}; the constructor is MultiHeadAttention(embed_dim, num_heads)")
    for name in PROJS:
        proj = getattr(ours, name, None)
        if not isinstance(proj, nn.Linear) or (proj.in_features, proj.out_features) != (E, E) or proj.bias is None:
            fail_with(f"MultiHeadAttention({E}, {H}).{name} must be nn.Linear({E}, {E}) with a bias (as in "
                      f"nn.MultiheadAttention), got {proj!r}")
    ref = nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        for name, (w, b) in torch_projections(ref).items():
            getattr(ours, name).weight.copy_(w)
            getattr(ours, name).bias.copy_(b)
    return ours.float().eval(), ref.eval()


def torch_projections(ref: nn.MultiheadAttention, grad: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{q_proj, k_proj, v_proj, out_proj: (weight, bias)} of nn.MultiheadAttention (or their gradients): torch keeps
    W_Q, W_K, W_V as the row blocks of one (3E, E) in_proj_weight."""
    get = (lambda p: p.grad) if grad else (lambda p: p)
    weights = [*get(ref.in_proj_weight).chunk(3), get(ref.out_proj.weight)]
    biases = [*get(ref.in_proj_bias).chunk(3), get(ref.out_proj.bias)]
    return dict(zip(PROJS, zip(weights, biases, strict=True), strict=True))


def make_inputs(mode: str, masks: str | None) -> tuple[list[torch.Tensor], dict, str]:
    """([query, key, value], the masks as our keyword arguments, the case in words). Self-attention passes one
    tensor three times, as models do; no mask hides every key of a query (that row would be NaN in torch)."""
    gen = torch.Generator().manual_seed(1)
    if mode == "self":
        x = torch.randn(B, L, E, generator=gen)
        qkv, s = [x, x, x], L
    else:
        qkv, s = [torch.randn(B, t, E, generator=gen) for t in (L, S, S)], S
    kwargs = {}
    if masks and "padding" in masks:
        pad = torch.zeros(B, s, dtype=torch.bool)
        pad[0, -1:] = pad[1, -3:] = True  # sequences 1 and 3 keys shorter; key 0 is never padding
        kwargs["key_padding_mask"] = pad
    if masks and "causal" in masks:
        kwargs["is_causal"] = True
    words = f"{mode}-attention (B={B}, L={L}, S={s}, E={E}, H={H}) with {masks or 'no mask'}"
    return qkv, kwargs, words


def attention(ref: nn.MultiheadAttention, query, key, value, key_padding_mask=None, is_causal=False,
              mistake: str | None = None) -> torch.Tensor:
    """Multi-head attention with ref's weights written out step by step, with one of MISTAKES planted (None: the
    correct formula, equal to ref)."""
    (Wq, Wk, Wv), (bq, bk, bv) = ref.in_proj_weight.chunk(3), ref.in_proj_bias.chunk(3)
    b, t, s = query.shape[0], query.shape[1], key.shape[1]

    def split(x, n):  # (B, n, E) -> (B, H, n, D)
        return x.reshape(b, H, n, D) if mistake == "split_view" else x.view(b, n, H, D).transpose(1, 2)

    value = key if mistake == "value_from_key" else value
    q, k, v = split(F.linear(query, Wq, bq), t), split(F.linear(key, Wk, bk), s), split(F.linear(value, Wv, bv), s)
    att = q @ k.transpose(-2, -1)  # (B, H, L, S)
    att = att * {"no_scale": 1.0, "scale_embed_dim": E ** -0.5}.get(mistake, D ** -0.5)
    fill = 0.0 if mistake == "mask_zero" else float("-inf")
    if key_padding_mask is not None:
        pad = ~key_padding_mask if mistake == "padding_inverted" else key_padding_mask
        att = att.masked_fill(pad.view(b, 1, s, 1) if mistake == "padding_on_queries" else pad.view(b, 1, 1, s), fill)
    if is_causal:
        ones = torch.ones(t, s, dtype=torch.bool)
        future = {"causal_transposed": ones.tril(-1), "causal_diagonal": ones.triu(0)}.get(mistake, ones.triu(1))
        att = att.masked_fill(future, fill)
    y = att.softmax(dim=-2 if mistake == "softmax_queries" else -1) @ v  # (B, H, L, D)
    y = y.reshape(b, t, E) if mistake == "merge_reshape" else y.transpose(1, 2).reshape(b, t, E)
    return y if mistake == "no_out_proj" else ref.out_proj(y)


def name_the_mistake(ref, qkv, kwargs, got: torch.Tensor) -> str:
    """The mistake whose written-out attention gives the rewrite's output, or general advice."""
    with torch.no_grad():
        for mistake, message in MISTAKES.items():
            try:
                planted = attention(ref, *qkv, **kwargs, mistake=mistake)
            except RuntimeError:  # this mistake cannot even run on these shapes
                continue
            if torch.allclose(got, planted, atol=TOL, rtol=0, equal_nan=True):
                return f"the likely mistake: {message}."
    if got.isnan().any():
        return ("the output holds NaN: some query has every key masked (-inf everywhere gives NaN in softmax); "
                "check which keys the masks hide.")
    return ("it matches none of the classic mistakes this grader knows; check each step against the shapes: "
            "split heads (B, L, E) -> (B, L, H, D) -> (B, H, L, D), scores q @ kᵀ / sqrt(head_dim) -> (B, H, L, S), "
            "masks (-inf where hidden), softmax over the keys (dim=-1), @ v -> (B, H, L, D), merge heads "
            "transpose(1, 2) -> (B, L, H, D) -> reshape (B, L, E), out_proj.")


@contextlib.contextmanager
def attention_not_borrowed():
    """While the rewrite runs, torch's own attention functions raise: the rewrite must compute attention itself."""
    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"the rewrite called torch's {name}: compute attention yourself (Q Kᵀ, softmax, "
                                 "weights @ V) from the four nn.Linear")
        return call

    with contextlib.ExitStack() as stack:
        for owner, name in FORBIDDEN:
            stack.enter_context(mock.patch.object(owner, name, refuse(name)))
        yield


def run_rewrite(ours, qkv, kwargs, words) -> torch.Tensor:
    out = problem = None
    try:
        with attention_not_borrowed():
            out = ours(*qkv, **kwargs)
    except Exception as e:
        problem = str(e) if "the rewrite called torch's" in str(e) else (
            f"forward on {words} raised {type(e).__name__}: {e}"
            + (" (key and value have S tokens, the query L: split k and v with S = key.shape[1])"
               if words.startswith("cross") else ""))
    if problem:
        fail_with(problem)
    out = out[0] if isinstance(out, tuple) else out
    if not isinstance(out, torch.Tensor) or out.shape != (B, L, E):
        fail_with(f"forward on {words} must return the output of shape (B, L, E) = {(B, L, E)}, got "
                  f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    return out


@pytest.mark.parametrize("mode,masks", CASES, ids=[f"{m}-{k or 'nomask'}" for m, k in CASES])
def test_output_and_gradients_equal_torch(pair, mode, masks):
    ours, ref = pair
    qkv, kwargs, words = make_inputs(mode, masks)
    leaves = list(dict.fromkeys(qkv))  # one leaf for self-attention, three for cross-attention
    ours_in = {id(t): t.clone().requires_grad_() for t in leaves}
    ref_in = {id(t): t.clone().requires_grad_() for t in leaves}
    out = run_rewrite(ours, [ours_in[id(t)] for t in qkv], kwargs, words)
    torch_kwargs = {"key_padding_mask": kwargs.get("key_padding_mask")}
    if kwargs.get("is_causal"):
        torch_kwargs["attn_mask"] = torch.ones(L, qkv[1].shape[1], dtype=torch.bool).triu(1)
    expected, _ = ref(*[ref_in[id(t)] for t in qkv], need_weights=False, **torch_kwargs)
    diff = (out - expected).abs().max().item()
    if not diff <= TOL:
        fail_with(f"the output differs from nn.MultiheadAttention's by {diff:.2e} (> {TOL}) on {words}; "
                  + name_the_mistake(ref, qkv, kwargs, out.detach()))

    # Gradients: the same upstream gradient into both; compare inputs, weights and biases.
    upstream = torch.randn(B, L, E, generator=torch.Generator().manual_seed(2))
    for module in pair:
        module.zero_grad(set_to_none=True)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    names = ["query", "key", "value"] if len(leaves) == 3 else ["query (= key = value)"]
    got = {n: ours_in[id(t)].grad for n, t in zip(names, leaves, strict=True)}
    want = {n: ref_in[id(t)].grad for n, t in zip(names, leaves, strict=True)}
    for name, (w, b) in torch_projections(ref, grad=True).items():
        proj = getattr(ours, name)
        got |= {f"{name}.weight": proj.weight.grad, f"{name}.bias": proj.bias.grad}
        want |= {f"{name}.weight": w, f"{name}.bias": b}
    for name, g in got.items():
        if g is None:
            fail_with(f"no gradient reached {name} on {words}: something cuts it out of autograd (.detach(), "
                      ".data, torch.no_grad(), a NumPy round trip)")
        diff = (g - want[name]).abs().max().item()
        if not diff <= TOL:
            fail_with(f"the output is right but the gradient of {name} differs from torch's by {diff:.2e} on {words}: "
                      "a step is hidden from autograd (.data, .detach(), an in-place edit of a saved tensor)")
