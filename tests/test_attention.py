"""phase2_attention/attention.py: equal to nn.MultiheadAttention (outputs, weights, gradients), sdpa == math,
KV cache == one causal pass, GQA == explicit references, dropout, all-masked rows, a drop-in from_torch (either layout,
train/eval), one torch.compile graph, and every bad-argument error."""

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from torch import nn

sys.path.insert(0, str(REPO / "phase2_attention"))
from attention import KVCache, MultiHeadAttention  # noqa: E402

B, L, S, E, H = 2, 5, 7, 16, 4
TOL = {"atol": 1e-5, "rtol": 0}  # fp32


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second intra-op thread only spins (20x the CPU time on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keep_key0(mask: torch.Tensor) -> torch.Tensor:
    """Never mask key 0, so no query row loses every key (torch gives NaN there; ours is tested separately)."""
    mask = mask.clone()
    if mask.dtype == torch.bool:
        mask[..., 0] = False
    else:
        mask[..., 0] = 0.0
    return mask


def random_masks(kind: str, L: int, S: int, gen: torch.Generator) -> tuple[dict, dict]:
    """(torch kwargs, our kwargs) for one mask setting. torch's is_causal is only a hint that needs the mask too (and
    that torch's SDPA reads as top-left aligned, so for L != S torch gets our bottom-right mask without the hint)."""
    drop = lambda *shape: torch.rand(*shape, generator=gen) < 0.3  # noqa: E731
    floats = lambda *shape: torch.randn(*shape, generator=gen).masked_fill(drop(*shape), float("-inf"))  # noqa: E731
    causal = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)
    if kind == "none":
        m = {}
    elif kind == "padding_bool":
        m = {"key_padding_mask": keep_key0(drop(B, S))}
    elif kind == "padding_float":
        m = {"key_padding_mask": keep_key0(floats(B, S))}
    elif kind == "attn_bool":
        m = {"attn_mask": keep_key0(drop(L, S))}
    elif kind == "attn_float":
        m = {"attn_mask": keep_key0(floats(L, S))}
    elif kind == "attn_3d":  # (B*H, L, S): a different mask per batch element and head
        m = {"attn_mask": keep_key0(floats(B * H, L, S))}
    elif kind == "padding_and_attn":
        m = {"key_padding_mask": keep_key0(drop(B, S)), "attn_mask": keep_key0(drop(L, S))}
    elif kind == "causal":
        return {"attn_mask": causal, "is_causal": L == S}, {"is_causal": True}
    elif kind == "causal_and_padding":
        kpm = keep_key0(drop(B, S))
        return {"attn_mask": causal, "is_causal": L == S, "key_padding_mask": kpm}, \
            {"is_causal": True, "key_padding_mask": kpm}
    elif kind == "causal_and_float":  # ours combines is_causal with attn_mask; torch gets the sum
        am = keep_key0(floats(L, S))
        return {"attn_mask": am.masked_fill(causal, float("-inf"))}, {"is_causal": True, "attn_mask": am}
    return m, dict(m)


def inputs(mode: str, gen: torch.Generator, kdim=E, vdim=E):
    """(query, key, value) leaf tensors; self-attention passes one tensor three times, as models do."""
    if mode == "self":
        x = torch.randn(B, L, E, generator=gen, requires_grad=True)
        return x, x, x
    q = torch.randn(B, L, E, generator=gen, requires_grad=True)
    k = torch.randn(B, S, kdim, generator=gen, requires_grad=True)
    v = k if vdim == kdim and mode == "cross" else torch.randn(B, S, vdim, generator=gen, requires_grad=True)
    return q, k, v


def run_with_grads(module, q, k, v, gen_seed: int, **kwargs):
    """Output, weights and the gradients of inputs and projection weights for a fixed random loss."""
    for t in {id(t): t for t in (q, k, v)}.values():
        t.grad = None
    out, weights = module(q, k, v, **kwargs)
    g = torch.Generator().manual_seed(gen_seed)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=g)).sum()
    loss.backward()
    return out, weights, [t.grad.clone() for t in (q, k, v)]


def projection_grads(module) -> list[torch.Tensor]:
    if isinstance(module, MultiHeadAttention):
        return [m.weight.grad for m in (module.q_proj, module.k_proj, module.v_proj, module.out_proj)]
    qkv = module.in_proj_weight.grad.chunk(3) if module.in_proj_weight is not None else \
        (module.q_proj_weight.grad, module.k_proj_weight.grad, module.v_proj_weight.grad)
    return [*qkv, module.out_proj.weight.grad]


MASKS = ["none", "padding_bool", "padding_float", "attn_bool", "attn_float", "attn_3d", "padding_and_attn",
         "causal", "causal_and_padding", "causal_and_float"]
WEIGHTS = [(False, True), (True, True), (True, False)]  # (need_weights, average_attn_weights)


@pytest.mark.parametrize("need_weights,average", WEIGHTS, ids=["no_weights", "avg_weights", "head_weights"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("mode", ["self", "cross", "cross_kvdim"])
@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_parity_with_torch(impl, mode, bias, mask_kind, need_weights, average):
    gen = torch.Generator().manual_seed(100 * MASKS.index(mask_kind) + len(mode))
    kdim, vdim = (6, 3) if mode == "cross_kvdim" else (E, E)
    Lq, Sk = (L, L) if mode == "self" else (L, S)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref, impl=impl).eval()
    torch_masks, our_masks = random_masks(mask_kind, Lq, Sk, gen)
    q, k, v = inputs(mode, gen, kdim, vdim)
    kw = {"need_weights": need_weights, "average_attn_weights": average}
    want = run_with_grads(ref, q, k, v, 1, **torch_masks, **kw)
    got = run_with_grads(ours, q, k, v, 1, **our_masks, **kw)
    torch.testing.assert_close(got[0], want[0], **TOL)
    if need_weights:
        assert got[1].shape == ((B, Lq, Sk) if average else (B, H, Lq, Sk))
        torch.testing.assert_close(got[1], want[1], **TOL)
    else:
        assert got[1] is None and want[1] is None
    for g, w in zip(got[2], want[2], strict=True):  # d loss / d query, key, value
        torch.testing.assert_close(g, w, **TOL)
    for g, w in zip(projection_grads(ours), projection_grads(ref), strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "causal_and_padding", "attn_3d", "padding_float"])
def test_sdpa_equals_math(mask_kind, num_kv_heads):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    math_mha = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads).eval()
    sdpa_mha = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, impl="sdpa").eval()
    sdpa_mha.load_state_dict(math_mha.state_dict())
    _, masks = random_masks(mask_kind, L, L, gen)
    q, k, v = inputs("self", gen)
    want, got = run_with_grads(math_mha, q, k, v, 2, **masks), run_with_grads(sdpa_mha, q, k, v, 2, **masks)
    torch.testing.assert_close(got[0], want[0], **TOL)
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_kv_cache_equals_one_causal_pass(impl, num_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, impl=impl).eval()
    T = 9
    x = torch.randn(B, T, E)
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, 1] = True  # a padded prompt token stays masked for every later step
    full, _ = mha(x, x, x, key_padding_mask=padding, is_causal=True)
    cache, outs = KVCache(), []
    for start, end in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:  # a 4-token prompt, then one token at a time
        chunk = x[:, start:end]
        out, _ = mha(chunk, chunk, chunk, key_padding_mask=padding[:, :end], is_causal=True, kv_cache=cache)
        outs.append(out)
        assert len(cache) == end
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **TOL)
    assert cache.k.shape == cache.v.shape == (B, num_kv_heads, T, E // H)  # GQA caches H / H_kv times fewer heads


def test_causal_with_fewer_queries_is_bottom_right():
    """is_causal with L < S: query l is token S - L + l, as after a KV cache (torch SDPA's flag is top-left)."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H).eval()
    q, kv = torch.randn(B, 3, E), torch.randn(B, 5, E)
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(mha(q, kv, kv, is_causal=True)[0], mha(q, kv, kv, attn_mask=mask)[0], **TOL)


def gqa_reference_sdpa(mha: MultiHeadAttention, x: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """GQA by hand from the module's weights: SDPA with enable_gqa=True does the K/V head sharing."""
    Hk, D = mha.num_kv_heads, mha.head_dim
    q = F.linear(x, mha.q_proj.weight, mha.q_proj.bias).view(B, -1, H, D).transpose(1, 2)
    k = F.linear(x, mha.k_proj.weight, mha.k_proj.bias).view(B, -1, Hk, D).transpose(1, 2)
    v = F.linear(x, mha.v_proj.weight, mha.v_proj.bias).view(B, -1, Hk, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    return F.linear(out.transpose(1, 2).reshape(B, -1, E), mha.out_proj.weight, mha.out_proj.bias)


def torch_mha_with_repeated_kv(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    """nn.MultiheadAttention whose K/V weights repeat each GQA K/V head for its group of query heads."""
    groups, D = H // mha.num_kv_heads, mha.head_dim
    rep = lambda w: w.view(mha.num_kv_heads, D, *w.shape[1:]).repeat_interleave(groups, 0).reshape(E, *w.shape[1:])  # noqa: E731
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, rep(mha.k_proj.weight), rep(mha.v_proj.weight)]))
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, rep(mha.k_proj.bias), rep(mha.v_proj.bias)]))
        ref.out_proj.load_state_dict(mha.out_proj.state_dict())
    return ref


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_equals_references(impl, num_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, num_kv_heads=num_kv_heads, impl=impl).eval()
    assert mha.k_proj.weight.shape == (num_kv_heads * E // H, E)  # fewer K/V parameters, not just shared at runtime
    x = torch.randn(B, L, E)
    for causal in (False, True):
        got, _ = mha(x, x, x, is_causal=causal)
        torch.testing.assert_close(got, gqa_reference_sdpa(mha, x, causal), **TOL)
    ref = torch_mha_with_repeated_kv(mha)
    padding = keep_key0(torch.rand(B, L) < 0.4)
    want = ref(x, x, x, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    got = mha(x, x, x, key_padding_mask=padding, need_weights=True, average_attn_weights=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_dropout_acts_in_train_mode_only(impl):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dropout=0.5, batch_first=True)
    mha = MultiHeadAttention.from_torch(ref, impl=impl)
    x = torch.randn(B, L, E)
    need_weights = impl == "math"  # ours and torch both take the explicit-weights path then
    mha.train(), ref.train()
    torch.manual_seed(1)
    train_a, w = mha(x, x, x, need_weights=need_weights, average_attn_weights=False)
    train_b, _ = mha(x, x, x)
    assert not torch.allclose(train_a, train_b), "two training steps drew the same dropout mask"
    if need_weights:
        assert (w == 0).float().mean() > 0.3 and w.max() > 1.0  # dropped links, survivors scaled by 1 / (1 - p)
    torch.manual_seed(1)  # same RNG stream -> same mask as nn.MultiheadAttention
    want, _ = ref(x, x, x, need_weights=need_weights)
    torch.testing.assert_close(train_a, want, **TOL)
    mha.eval(), ref.eval()
    eval_a, eval_b = mha(x, x, x)[0], mha(x, x, x)[0]
    assert torch.equal(eval_a, eval_b)
    torch.testing.assert_close(eval_a, ref(x, x, x, need_weights=False)[0], **TOL)
    assert not torch.allclose(eval_a, train_a)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_all_masked_rows_give_zero_attention_not_nan(impl):
    """A query with no key left: weights 0, attention output 0, so the layer returns out_proj.bias; grads finite."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        ref.out_proj.bias.normal_()
    mha = MultiHeadAttention.from_torch(ref, impl=impl).eval()
    x = torch.randn(B, L, E, requires_grad=True)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1] = True  # batch element 1: every key padded
    attn = torch.zeros(L, L, dtype=torch.bool)
    attn[2] = True  # query 2: every key masked
    out, _ = mha(x, x, x, key_padding_mask=padding, attn_mask=attn)
    torch.testing.assert_close(out[1], ref.out_proj.bias.expand(L, E), **TOL)
    torch.testing.assert_close(out[0, 2], ref.out_proj.bias, **TOL)
    # The other rows are untouched; torch's SDPA path (need_weights=False) zeroes such rows the same way.
    torch.testing.assert_close(out, ref(x, x, x, key_padding_mask=padding, attn_mask=attn, need_weights=False)[0],
                               **TOL)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    _, weights = mha(x, x, x, key_padding_mask=padding, attn_mask=attn, need_weights=True)
    assert torch.isfinite(weights).all() and (weights[1] == 0).all() and (weights[0, 2] == 0).all()
    torch.testing.assert_close(weights[0, [0, 1, 3, 4]].sum(-1), torch.ones(4), **TOL)


def test_uses_only_four_linears(monkeypatch):
    """Nothing inside calls nn.MultiheadAttention or F.multi_head_attention_forward."""
    def forbidden(*args, **kwargs):
        raise AssertionError("used a ready-made attention")
    monkeypatch.setattr(F, "multi_head_attention_forward", forbidden)
    monkeypatch.setattr(nn.MultiheadAttention, "forward", forbidden)
    mha = MultiHeadAttention(E, H)
    assert [type(m) for m in mha.children()] == [nn.Linear] * 4
    x = torch.randn(B, L, E)
    assert mha(x, x, x, need_weights=True)[0].shape == (B, L, E)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_from_torch_is_a_drop_in_for_either_layout(batch_first, impl):
    """A default nn.MultiheadAttention is sequence-first, (L, B, E): the converted module takes and returns the same
    layout, with the same output, weights and gradients (cross-attention with kdim/vdim, both masks)."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, kdim=6, vdim=3, batch_first=batch_first).eval()
    ours = MultiHeadAttention.from_torch(ref, impl=impl)
    assert ours.batch_first == batch_first
    q, k, v = inputs("cross_kvdim", gen, kdim=6, vdim=3)  # (B, L|S, features)
    if not batch_first:
        q, k, v = (t.detach().transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v))  # (L|S, B, features)
    masks, _ = random_masks("padding_and_attn", L, S, gen)
    kw = {"need_weights": impl == "math", "average_attn_weights": False, **masks}
    got, want = run_with_grads(ours, q, k, v, 3, **kw), run_with_grads(ref, q, k, v, 3, **kw)
    assert got[0].shape == ((B, L, E) if batch_first else (L, B, E))
    for g, w in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]], strict=True):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_from_torch_copies_train_eval_mode(training):
    ref = nn.MultiheadAttention(E, H, dropout=0.5).train(training)
    assert MultiHeadAttention.from_torch(ref).training == training


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_compiles_as_one_graph_with_padding(impl):
    """torch.compile(fullgraph=True) raises on any graph break, e.g. a Python `if` on tensor data. The aot_eager
    backend traces the forward and backward graphs exactly as inductor would, without generating C++ (seconds, not
    a minute); the all-padded batch element must still give zero attention, not NaN."""
    torch._dynamo.reset()  # a fresh compile cache per test
    torch.manual_seed(0)
    mha = MultiHeadAttention(E, H, impl=impl)
    compiled = torch.compile(mha, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, L, E, requires_grad=True)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1] = True  # batch element 1: every key padded
    got, _ = compiled(x, x, x, key_padding_mask=padding, is_causal=True)
    want, _ = mha(x, x, x, key_padding_mask=padding, is_causal=True)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got[1], mha.out_proj.bias.expand(L, E), **TOL)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_from_torch_without_bias_and_with_kdim():
    ref = nn.MultiheadAttention(E, H, bias=False, kdim=6, vdim=3)
    mha = MultiHeadAttention.from_torch(ref)
    assert mha.q_proj.bias is None and mha.out_proj.bias is None
    torch.testing.assert_close(mha.k_proj.weight, ref.k_proj_weight, **TOL)
    torch.testing.assert_close(mha.v_proj.weight, ref.v_proj_weight, **TOL)


x5, k7 = torch.zeros(B, L, E), torch.zeros(B, S, E)


@pytest.mark.parametrize("build,message", [
    (lambda: MultiHeadAttention(10, 4), "embed_dim (10) must be divisible by num_heads (4)"),
    (lambda: MultiHeadAttention(16, 4, num_kv_heads=3), "num_heads (4) must be divisible by num_kv_heads (3)"),
    (lambda: MultiHeadAttention(16, 4, dropout=1.0), "dropout must be in [0, 1)"),
    (lambda: MultiHeadAttention(16, 4, impl="flash"), "impl must be one of ('math', 'sdpa')"),
    (lambda: MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, add_bias_kv=True)), "add_bias_kv"),
])
def test_bad_constructor_arguments(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)


@pytest.mark.parametrize("call,message", [
    (lambda m: m(x5[0], x5[0], x5[0]), "query must have shape (B, L, embed_dim) = (B, L, 16), got (5, 16)"),
    (lambda m: m(x5, torch.zeros(B, S, 6), k7), "key must have shape (B, S, kdim) = (2, S, 16), got (2, 7, 6)"),
    (lambda m: m(x5, k7, torch.zeros(B, 6, E)), "value must have shape (B, S, vdim) = (2, 7, 16), got (2, 6, 16)"),
    (lambda m: m(x5, k7, k7, key_padding_mask=torch.zeros(B, L, dtype=torch.bool)),
     "key_padding_mask must have shape (B, S) = (2, 7), got (2, 5)"),
    (lambda m: m(x5, k7, k7, attn_mask=torch.zeros(L, L)),
     "attn_mask must have shape (L, S) = (5, 7) or (B*num_heads, L, S) = (8, 5, 7), got (5, 5)"),
    (lambda m: m(x5, k7, k7, attn_mask=torch.zeros(H, L, S)), "(B*num_heads, L, S) = (8, 5, 7), got (4, 5, 7)"),
    (lambda m: m(x5, k7, k7, attn_mask=torch.zeros(L, S, dtype=torch.long)),
     "attn_mask must be bool (True = may not attend) or floating point"),
    (lambda m: m(x5, k7, k7, key_padding_mask=torch.zeros(B, S, dtype=torch.int32)), "got dtype torch.int32"),
])
def test_bad_forward_arguments(call, message):
    with pytest.raises(ValueError) as err:
        call(MultiHeadAttention(E, H))
    assert message in str(err.value)


def test_sequence_first_errors_name_the_sequence_first_shape():
    mha = MultiHeadAttention(E, H, batch_first=False)
    with pytest.raises(ValueError, match=r"query must have shape \(L, B, embed_dim\) = \(L, B, 16\), got \(5, 16\)"):
        mha(x5[0], x5[0], x5[0])
    q, k = x5.transpose(0, 1), k7.transpose(0, 1)  # (L, B, E), (S, B, E)
    with pytest.raises(ValueError, match=r"key must have shape \(S, B, kdim\) = \(S, 2, 16\), got \(2, 7, 16\)"):
        mha(q, k7, k7)
    with pytest.raises(ValueError, match=r"value must have shape \(S, B, vdim\) = \(7, 2, 16\), got \(6, 2, 16\)"):
        mha(q, k, k[:6])


def test_options_after_value_are_keyword_only_and_masks_must_be_tensors():
    mha = MultiHeadAttention(E, H)
    padding = torch.zeros(B, S, dtype=torch.bool)
    with pytest.raises(TypeError, match="positional"):  # torch's 4th argument is key_padding_mask, ours was too
        mha(x5, k7, k7, padding)
    with pytest.raises(TypeError, match="positional"):  # torch's 5th is add_bias_kv, not kdim
        MultiHeadAttention(E, H, 0.0, True, 6)
    with pytest.raises(TypeError, match=r"key_padding_mask must be a torch.Tensor .*, got list"):
        mha(x5, k7, k7, key_padding_mask=padding.tolist())
    with pytest.raises(TypeError, match=r"attn_mask must be a torch.Tensor .*, got ndarray"):
        mha(x5, k7, k7, attn_mask=torch.zeros(L, S).numpy())
    with pytest.raises(TypeError, match="value must be a torch.Tensor, got NoneType"):
        mha(x5, k7, None)


def test_bad_kv_cache_and_impl_are_rejected_before_any_change():
    mha = MultiHeadAttention(E, H)
    cache = KVCache()
    mha(x5, x5, x5, kv_cache=cache)
    with pytest.raises(ValueError, match=r"kv_cache.k must have shape .* = \(1, 4, 5, 4\), got \(2, 4, 5, 4\)"):
        mha(x5[:1, :1], x5[:1, :1], x5[:1, :1], kv_cache=cache)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, S\) = \(2, 6\)"):
        mha(x5[:, :1], x5[:, :1], x5[:, :1], key_padding_mask=torch.zeros(B, 1, dtype=torch.bool), kv_cache=cache)
    assert len(cache) == L  # the failed calls appended nothing
    with pytest.raises(ValueError, match="impl must be one of"):
        mha.impl = "fast"
    assert mha.impl == "math"
