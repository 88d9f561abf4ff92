"""Multi-head attention from four nn.Linear layers, numerically equal to torch.nn.MultiheadAttention.

Letters used in every shape comment:
    B batch, L query length, S key length (cached + new keys), E embed_dim,
    H query heads, H_kv key/value heads (H_kv < H is grouped-query attention), D = E // H head dim.

Inputs are batch-first by default: query (B, L, E), key (B, S, kdim), value (B, S, vdim); with batch_first=False
(nn.MultiheadAttention's default, which from_torch copies) they are (L, B, E), (S, B, kdim), (S, B, vdim) and so is the
output. Masks follow nn.MultiheadAttention: a bool True means "may not attend", a float mask is added to the scores;
key_padding_mask is (B, S), attn_mask is (L, S) or (B*H, L, S) with row b*H + h for batch b, head h.

The demo that runs this module step by step is walkthrough.py (`python phase2_attention/walkthrough.py`).

Defaults that differ from nn.MultiheadAttention:
  * need_weights=False (torch: True). Weights are opt-in because building them costs a (B, H, L, S) tensor and rules
    out the SDPA kernel; pass need_weights=True to get them, averaged over heads as torch does.
  * batch_first=True (torch: False). from_torch copies the flag of the module it converts.

Behaviour that differs from nn.MultiheadAttention (on purpose, and documented in the README):
  * is_causal=True builds the causal mask itself (torch treats it as a hint and requires attn_mask). It combines with
    any attn_mask / key_padding_mask, and it is aligned bottom-right: query l sits at absolute position S - L + l,
    so with a KV cache (or any L < S) the new tokens see every cached token. For L == S this is the usual triangle.
  * A query row whose keys are all masked gets weights 0 and attention output 0 (so the layer returns out_proj.bias
    for it), with finite gradients. nn.MultiheadAttention gives NaN for such rows when need_weights=True or on its
    inference fast path, and zeros on its SDPA path (need_weights=False with autograd on).
  * impl="sdpa" runs F.scaled_dot_product_attention; calls with need_weights=True take the math path because SDPA
    does not return the weights (nn.MultiheadAttention makes the same switch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("math", "sdpa")


class KVCache:
    """Projected keys and values of every token seen so far: k and v are (B, H_kv, S_past, D).

    Stored after the head split and before the GQA repetition, so a GQA cache is H / H_kv times smaller than an MHA
    cache. Use one cache per attention layer; `forward(..., kv_cache=cache)` appends the new tokens' K/V and attends
    over all of them."""

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # torch.cat copies the cache on every step (O(S) per token, like the attention itself); servers preallocate
        # a static cache or page it (vLLM) to avoid the copy.
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)  # (B, H_kv, S_past + S_new, D)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)  # (B, H_kv, S_past + S_new, D)
        return self.k, self.v


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * groups, S, D): query head h reads K/V head h // groups (Llama's repeat_kv)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _check_mask_type(mask: object, name: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool: True = may not attend, or float: added to the "
                        f"scores), got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"{name} must be bool (True = may not attend) or floating point (added to the scores), "
                         f"got dtype {mask.dtype}")


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool mask becomes 0 / -inf (True = may not attend); a float mask is added as it is (in the scores' dtype)."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiHeadAttention(nn.Module):
    """softmax(Q Kᵀ/√D + mask) V per head, from q_proj, k_proj, v_proj and out_proj (four nn.Linear).

    impl="math" (default) runs the steps one by one; impl="sdpa" uses F.scaled_dot_product_attention. Choose it in
    the constructor or set `module.impl` later (e.g. math for explaining, sdpa for speed); both give the same numbers.

        mha = MultiHeadAttention(embed_dim=64, num_heads=8, num_kv_heads=2)    # GQA: 8 query heads share 2 K/V heads
        out, _ = mha(x, x, x, is_causal=True)                                 # x: (B, T, 64) -> out: (B, T, 64)

    Arguments mirror nn.MultiheadAttention (everything after num_heads, dropout and bias is keyword-only), with
    num_kv_heads and impl added; defaults that differ from torch's: batch_first=True and, in forward,
    need_weights=False (see the module docstring).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, *,
                 kdim: int | None = None, vdim: int | None = None, num_kv_heads: int | None = None,
                 batch_first: bool = True, impl: str = "math", device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if embed_dim <= 0 or num_heads <= 0 or num_kv_heads <= 0:
            raise ValueError(f"embed_dim, num_heads and num_kv_heads must be positive, "
                             f"got {embed_dim}, {num_heads}, {num_kv_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}): "
                             f"each head gets embed_dim // num_heads features")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads}): "
                             f"each K/V head serves num_heads // num_kv_heads query heads")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self.dropout, self.batch_first = dropout, batch_first
        self.impl = impl
        kv_dim = num_kv_heads * self.head_dim  # GQA: K and V are projected to fewer heads than Q
        factory = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, **factory)  # W_Q: (E, E)
        self.k_proj = nn.Linear(self.kdim, kv_dim, **factory)  # W_K: (kdim, H_kv*D)
        self.v_proj = nn.Linear(self.vdim, kv_dim, **factory)  # W_V: (vdim, H_kv*D)
        self.out_proj = nn.Linear(embed_dim, embed_dim, **factory)  # W_O: (E, E) mixes the heads' outputs

    @property
    def impl(self) -> str:
        """"math" (step by step, the default) or "sdpa" (F.scaled_dot_product_attention); may be changed any time."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {value!r}")
        self._impl = value

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dropout={self.dropout}, batch_first={self.batch_first}, impl={self.impl!r}")

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, impl: str = "math") -> MultiHeadAttention:
        """A drop-in for `mha`: its weights, batch_first flag, train/eval mode, device and dtype."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported")
        bias = mha.in_proj_bias is not None
        ours = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias, kdim=mha.kdim, vdim=mha.vdim,
                   batch_first=mha.batch_first, impl=impl, device=mha.out_proj.weight.device,
                   dtype=mha.out_proj.weight.dtype).train(mha.training)
        if mha.in_proj_weight is not None:  # kdim == vdim == embed_dim: one packed (3E, E) matrix, rows [W_Q; W_K; W_V]
            weights = mha.in_proj_weight.chunk(3)
        else:  # kdim or vdim differ: three separate matrices
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        projections = (ours.q_proj, ours.k_proj, ours.v_proj)
        with torch.no_grad():
            for proj, weight in zip(projections, weights, strict=True):
                proj.weight.copy_(weight)
            ours.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                for proj, b in zip(projections, mha.in_proj_bias.chunk(3), strict=True):
                    proj.bias.copy_(b)
                ours.out_proj.bias.copy_(mha.out_proj.bias)
        return ours

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *, key_padding_mask: Tensor | None = None,
                need_weights: bool = False, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False, kv_cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """Returns (output (B, L, E), or (L, B, E) when not batch_first; weights): weights are (B, L, S) averaged over
        heads, (B, H, L, S) when average_attn_weights=False, and None unless need_weights (torch's default is True)."""
        B, L, S_new, S = self._check_inputs(query, key, value, key_padding_mask, attn_mask, kv_cache)
        H, H_kv, D, E = self.num_heads, self.num_kv_heads, self.head_dim, self.embed_dim
        if not self.batch_first:  # (L, B, E) -> (B, L, E): the steps below are written batch-first
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # 1) Projections: every token gets a query, a key and a value vector.
        q = self.q_proj(query)  # (B, L, E)  what each query token is looking for
        k = self.k_proj(key)  # (B, S_new, H_kv*D)  what each key token can be matched on
        v = self.v_proj(value)  # (B, S_new, H_kv*D)  what each key token hands over when matched
        # 2) Split the features into heads: each head attends on its own D features.
        q = q.view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)  H independent queries per token
        k = k.view(B, S_new, H_kv, D).transpose(1, 2)  # (B, H_kv, S_new, D)  keys per K/V head
        v = v.view(B, S_new, H_kv, D).transpose(1, 2)  # (B, H_kv, S_new, D)  values per K/V head
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, H_kv, S, D)  the cached tokens' keys/values plus the new ones
        # 3) Attention over the S keys, per head.
        use_sdpa = self.impl == "sdpa" and not need_weights  # SDPA cannot return the weights
        # A plain causal self-attention call lets SDPA make the triangle itself (flash kernels skip masked blocks).
        sdpa_causal = use_sdpa and is_causal and attn_mask is None and key_padding_mask is None and L == S
        causal = is_causal and not sdpa_causal
        mask, dead = self._merged_mask(key_padding_mask, attn_mask, causal, q, S)  # (B|1, H|1, L|1, S)  0 or -inf
        if use_sdpa:
            out = F.scaled_dot_product_attention(  # (B, H, L, D)  the same math in one fused kernel
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=sdpa_causal,
                **({"enable_gqa": True} if H_kv != H else {}))  # GQA without copying K/V (torch >= 2.5)
            weights = None
        else:
            out, weights = self._math_attention(q, k, v, mask)  # (B, H, L, D), (B, H, L, S)
        if dead is not None:  # zero a dead row's D outputs rather than its S weights: the same result, cheaper
            out = out.masked_fill(dead, 0.0)  # (B, H, L, D)  a query whose keys are all masked outputs 0
        # 4) Merge the heads and mix them.
        out = out.transpose(1, 2).reshape(B, L, E)  # (B, L, E)  heads side by side again: concat(head_1..head_H)
        out = self.out_proj(out)  # (B, L, E)  W_O lets every output feature read every head
        if not self.batch_first:
            out = out.transpose(0, 1)  # (L, B, E)  back to the caller's layout (weights stay (B, ...), as in torch)
        if not need_weights:
            return out, None
        if dead is not None:
            weights = weights.masked_fill(dead, 0.0)  # (B, H, L, S)  ...and its weights are 0, not NaN
        return out, weights.mean(dim=1) if average_attn_weights else weights  # (B, L, S) or (B, H, L, S)

    def _math_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """softmax(Q Kᵀ / √D + mask) V, one line per step. Returns (out (B, H, L, D), weights (B, H, L, S))."""
        groups = self.num_heads // self.num_kv_heads
        k = repeat_kv(k, groups)  # (B, H, S, D)  GQA: each K/V head serves `groups` query heads
        v = repeat_kv(v, groups)  # (B, H, S, D)  (a copy; SDPA's enable_gqa avoids it)
        q = q * self.head_dim ** -0.5  # (B, H, L, D)  1/√D keeps the scores' variance ~1 (scaling q: L·D, not L·S)
        scores = q @ k.transpose(-2, -1)  # (B, H, L, D) @ (B, H, D, S) -> (B, H, L, S)  how well query l matches key s
        if mask is not None:
            scores = scores + mask  # (B, H, L, S)  -inf where query l may not attend key s
        weights = scores.softmax(dim=-1)  # (B, H, L, S)  each row is a distribution over the S keys
        weights = F.dropout(weights, self.dropout, self.training)  # (B, H, L, S)  drops whole query-key links
        out = weights @ v  # (B, H, L, S) @ (B, H, S, D) -> (B, H, L, D)  weighted average of the value vectors
        return out, weights

    def _merged_mask(self, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
                     q: Tensor, S: int) -> tuple[Tensor | None, Tensor | None]:
        """All masks summed into one additive float mask that broadcasts to the scores (B, H, L, S): 0 = may attend,
        -inf = may not. Also returns `dead`, a bool (.., L, 1) marking query rows with every key masked; those rows are
        opened in the mask so softmax stays finite, and their output is zeroed. Both are None when there is no mask."""
        B, _, L, _ = q.shape  # q: (B, H, L, D)
        masks = []
        if attn_mask is not None:
            m = _additive(attn_mask, q.dtype)
            masks.append(m.reshape(1, 1, L, S) if m.dim() == 2 else m.reshape(B, self.num_heads, L, S))  # row b*H + h
        if key_padding_mask is not None:
            masks.append(_additive(key_padding_mask, q.dtype).reshape(B, 1, 1, S))  # same for every head and query
        if is_causal:  # bottom-right aligned: query l is token S - L + l and sees keys 0 .. S - L + l
            future = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(S - L + 1)  # (L, S)
            masks.append(_additive(future, q.dtype).view(1, 1, L, S))
        if not masks:
            return None, None
        mask = masks[0]
        for m in masks[1:]:
            mask = mask + m  # broadcasts to (B|1, H|1, L|1, S)
        # No `if dead.any()` shortcut: a branch on tensor data would break torch.compile's graph. What it could skip
        # is cheap: this (B|1, 1, L, S) fill and one over the (B, H, L, D) output, not the (B, H, L, S) weights.
        dead = torch.isneginf(mask).all(dim=-1, keepdim=True)  # (B|1, H|1, L|1, 1)
        return mask.masked_fill(dead, 0.0), dead

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None,
                      attn_mask: Tensor | None, kv_cache: KVCache | None) -> tuple[int, int, int, int]:
        """Raise TypeError / ValueError naming the expected shape in the caller's layout (batch_first or not);
        returns (B, L, S_new, S) with S = cached + new keys."""
        def expect(ok: bool, name: str, expected: str, tensor: Tensor) -> None:
            if not ok:
                raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")

        def seq(batch, length, features) -> str:  # a (batch, sequence, features) shape as the caller lays it out
            return f"({batch}, {length}, {features})" if self.batch_first else f"({length}, {batch}, {features})"

        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        b, t = (0, 1) if self.batch_first else (1, 0)  # dims of batch and sequence in query, key and value
        E, H = self.embed_dim, self.num_heads
        expect(query.dim() == 3 and query.shape[2] == E, "query", f"{seq('B', 'L', 'embed_dim')} = {seq('B', 'L', E)}",
               query)
        B, L = query.shape[b], query.shape[t]
        expect(key.dim() == 3 and key.shape[b] == B and key.shape[2] == self.kdim, "key",
               f"{seq('B', 'S', 'kdim')} = {seq(B, 'S', self.kdim)}", key)
        S_new = key.shape[t]
        expect(value.dim() == 3 and (value.shape[b], value.shape[t], value.shape[2]) == (B, S_new, self.vdim),
               "value", f"{seq('B', 'S', 'vdim')} = {seq(B, S_new, self.vdim)}", value)
        S = S_new
        if kv_cache is not None and len(kv_cache):
            expected = (B, self.num_kv_heads, len(kv_cache), self.head_dim)
            expect(kv_cache.k.shape == expected, "kv_cache.k", f"(B, num_kv_heads, S_past, head_dim) = {expected}",
                   kv_cache.k)
            S += len(kv_cache)
        if key_padding_mask is not None:
            _check_mask_type(key_padding_mask, "key_padding_mask")
            expect(key_padding_mask.shape == (B, S), "key_padding_mask", f"(B, S) = ({B}, {S})", key_padding_mask)
        if attn_mask is not None:
            _check_mask_type(attn_mask, "attn_mask")
            expect(attn_mask.shape in ((L, S), (B * H, L, S)), "attn_mask",
                   f"(L, S) = ({L}, {S}) or (B*num_heads, L, S) = ({B * H}, {L}, {S})", attn_mask)
        return B, L, S_new, S

