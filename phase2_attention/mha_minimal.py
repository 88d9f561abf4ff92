"""Multi-head attention from four nn.Linear layers, equal to nn.MultiheadAttention(batch_first=True) within 1e-5.

The minimal version: read it first, then retype it from memory. attention.py is the full one (float masks, attention
weights, KV cache, GQA, the SDPA fast path, from_torch); README.md says what each addition is for.

    python phase2_attention/mha_minimal.py      # checks itself against nn.MultiheadAttention on the same weights

Letters in the shape comments: B batch, L query tokens, S key tokens, E embed_dim, H heads, D = E // H head dim.
Grade a rewrite of this file: python -m pytest tests/acceptance --impl mha_minimal=my_mha.py
"""

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    def __init__(self, embed_dim, num_heads):
        super().__init__()
        assert embed_dim % num_heads == 0, "each head gets embed_dim // num_heads features"
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)  # W_Q: what each token is looking for
        self.k_proj = nn.Linear(embed_dim, embed_dim)  # W_K: what each token can be matched on
        self.v_proj = nn.Linear(embed_dim, embed_dim)  # W_V: what each token hands over when matched
        self.out_proj = nn.Linear(embed_dim, embed_dim)  # W_O: mixes the heads' outputs

    def forward(self, query, key, value, key_padding_mask=None, is_causal=False):
        """query (B, L, E), key and value (B, S, E); key_padding_mask bool (B, S), True = padding (never attended);
        is_causal: query l sees keys 0..l (self-attention, L == S). Returns (B, L, E)."""
        B, L, E = query.shape
        S, H, D = key.shape[1], self.num_heads, self.head_dim
        # Projections: (B, L, E) @ (E, E)ᵀ -> (B, L, E), one query / key / value vector per token.
        q = self.q_proj(query).view(B, L, H, D).transpose(1, 2)  # (B, L, E) -> (B, L, H, D) -> (B, H, L, D)
        k = self.k_proj(key).view(B, S, H, D).transpose(1, 2)  # (B, S, E) -> (B, S, H, D) -> (B, H, S, D)
        v = self.v_proj(value).view(B, S, H, D).transpose(1, 2)  # (B, S, E) -> (B, S, H, D) -> (B, H, S, D)
        # (B, H, L, D) @ (B, H, D, S) -> (B, H, L, S): how well query l matches key s, in each head.
        att = q @ k.transpose(-2, -1)
        att = att / D**0.5  # 1/sqrt(head_dim): keeps the scores' variance ~1, so softmax does not saturate
        if key_padding_mask is not None:  # (B, S) -> (B, 1, 1, S): the same padded keys for every head and query
            att = att.masked_fill(key_padding_mask.view(B, 1, 1, S), float("-inf"))
        if is_causal:  # (L, S), True above the diagonal: key s > l is in query l's future
            future = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
            att = att.masked_fill(future, float("-inf"))
        att = att.softmax(dim=-1)  # (B, H, L, S): each row is a distribution over the S keys
        # (B, H, L, S) @ (B, H, S, D) -> (B, H, L, D): each query's weighted average of the value vectors.
        y = att @ v
        y = y.transpose(1, 2).reshape(B, L, E)  # (B, H, L, D) -> (B, L, H, D) -> (B, L, E): concat(head_1..head_H)
        return self.out_proj(y)  # (B, L, E) @ (E, E)ᵀ -> (B, L, E): every output feature reads every head


if __name__ == "__main__":
    torch.manual_seed(0)
    B, T, E, H = 2, 5, 16, 4
    ours, torch_mha = MultiHeadAttention(E, H), nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():  # torch keeps W_Q, W_K, W_V as the row blocks of one (3E, E) matrix
        for proj, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), torch_mha.in_proj_weight.chunk(3),
                              torch_mha.in_proj_bias.chunk(3), strict=True):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        ours.out_proj.load_state_dict(torch_mha.out_proj.state_dict())
    x = torch.randn(B, T, E)  # (B, T, E): self-attention, L = S = T
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -2:] = True  # the second sequence is 2 tokens shorter: its last 2 keys are padding
    expected, _ = torch_mha(x, x, x, key_padding_mask=pad, attn_mask=torch.ones(T, T, dtype=torch.bool).triu(1))
    diff = (ours(x, x, x, key_padding_mask=pad, is_causal=True) - expected).abs().max().item()
    assert diff < 1e-5, diff
    print(f"causal + padding, B={B} T={T} E={E} H={H}: max |ours - nn.MultiheadAttention| = {diff:.1e}")
