"""Walk through one MultiHeadAttention forward on a small example and print every step: the line of code, the shape
of the tensor it makes, and what that shape means.

The steps are recorded from the real forward (a sys.settrace hook reads each assigned variable after its line runs),
and the "meaning" column is that line's own comment in attention.py, so this printout cannot drift from the code.

    python phase2_attention/walkthrough.py                        # causal self-attention, B=2, L=S=5, E=8, H=2
    python phase2_attention/walkthrough.py --src_len 7 --kdim 6   # cross-attention: L != S, keys of another width
    python phase2_attention/walkthrough.py --num_kv_heads 1       # grouped-query attention (one K/V head)
    python phase2_attention/walkthrough.py --decode               # plus one generation step through a KV cache
"""

import argparse
import ast
import inspect
import io
import sys
import textwrap
import tokenize

import torch
from attention import KVCache, MultiHeadAttention
from torch import nn

TRACED = (MultiHeadAttention.forward, MultiHeadAttention._math_attention)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Print every step of one multi-head attention forward with its shape.")
    p.add_argument("--batch", type=int, default=2, help="B")
    p.add_argument("--seq_len", type=int, default=5, help="L, query tokens")
    p.add_argument("--src_len", type=int, default=None, help="S, key tokens (default: L, i.e. self-attention)")
    p.add_argument("--embed_dim", type=int, default=8, help="E")
    p.add_argument("--num_heads", type=int, default=2, help="H")
    p.add_argument("--num_kv_heads", type=int, default=None, help="H_kv < H gives grouped-query attention")
    p.add_argument("--kdim", type=int, default=None, help="feature width of key/value inputs (default: E)")
    p.add_argument("--no_causal", action="store_true", help="let every query see every key")
    p.add_argument("--pad", type=int, default=1, help="mask this many trailing keys of the last batch element")
    p.add_argument("--decode", action="store_true",
                   help="then feed one more token through a KV cache and print that step too")
    p.add_argument("--impl", choices=["math", "sdpa"], default="math")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.src_len is None:
        args.src_len = args.seq_len
    return args


def usage_problem(args) -> str | None:
    """What is wrong with the arguments, in one line (None when they are fine)."""
    sizes = [args.batch, args.seq_len, args.src_len, args.embed_dim, args.num_heads]
    if min(sizes) <= 0 or (args.kdim is not None and args.kdim <= 0) or args.pad < 0:
        return "sizes (--batch, --seq_len, --src_len, --embed_dim, --num_heads, --kdim) must be positive, --pad >= 0"
    if args.pad >= args.src_len:
        return f"--pad ({args.pad}) must be smaller than S ({args.src_len}), or a batch element has no keys"
    if args.decode and (args.src_len != args.seq_len or args.kdim or args.no_causal):
        return "--decode is for causal self-attention: drop --src_len, --kdim and --no_causal"
    return None


def assignments(func) -> dict[int, tuple[ast.stmt, str]]:
    """Every assignment and return in `func`, keyed by its first line number in the file, with its first comment."""
    lines, first = inspect.getsourcelines(func)
    source = textwrap.dedent("".join(lines))
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.setdefault(tok.start[0], tok.string.lstrip("# "))
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign | ast.Return):
            comment = next((comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments), "")
            out[first - 1 + node.lineno] = (node, comment)
    return out


def describe(value) -> str | None:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if value is None:
        return "None"
    if isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
        return ", ".join(describe(v) or "?" for v in value)
    return None  # ints, bools...: not a tensor step


def record_steps(call) -> tuple[object, list[tuple[str, str, str]]]:
    """Run call() with a trace on TRACED: after each assignment (or return) in them, note (code, shapes, comment)."""
    codes = {f.__code__: assignments(f) for f in TRACED}
    steps = []

    def note(frame, pending, returned=None):
        node, comment = codes[frame.f_code][pending]
        if isinstance(node, ast.Return):
            shapes = describe(returned)
        else:
            names = [t.id for tgt in node.targets for t in (tgt.elts if isinstance(tgt, ast.Tuple) else [tgt])
                     if isinstance(t, ast.Name)]
            values = [frame.f_locals.get(n) for n in names]
            shapes = describe(values[0] if len(values) == 1 else tuple(values))
        if comment and shapes is not None and shapes != "None":  # a step = a commented line that makes a tensor
            code = ast.unparse(node).split("\n")[0]
            steps.append((code if len(code) <= 56 else code[:55] + "…", shapes, comment))

    def on_call(frame, event, arg):
        if frame.f_code not in codes:
            return None
        stmts, pending = codes[frame.f_code], None

        def on_line(frame, event, arg):
            nonlocal pending
            if pending is not None and (event == "return" or frame.f_lineno > stmts[pending][0].end_lineno
                                        or frame.f_lineno < pending):  # it has run: its variables hold new values
                note(frame, pending, arg if event == "return" else None)
                pending = None
            if event == "line" and frame.f_lineno in stmts:
                pending = frame.f_lineno
            return on_line

        return on_line

    sys.settrace(on_call)
    try:
        result = call()
    finally:
        sys.settrace(None)
    return result, steps


def print_steps(steps: list[tuple[str, str, str]]) -> None:
    width = max(len(code) for code, _, _ in steps)
    print(f"{'step':>4}  {'code':<{width}}  {'shape':<26}  meaning (the line's comment in attention.py)")
    for i, (code, shapes, comment) in enumerate(steps, 1):
        print(f"{i:>4}  {code:<{width}}  {shapes:<26}  {comment}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    B, L, S, E, H = args.batch, args.seq_len, args.src_len, args.embed_dim, args.num_heads
    kdim = E if args.kdim is None else args.kdim
    try:
        if problem := usage_problem(args):
            raise ValueError(problem)
        mha = MultiHeadAttention(E, H, kdim=kdim, vdim=kdim, num_kv_heads=args.num_kv_heads, impl=args.impl)
    except ValueError as e:  # ours names the expected shape (e.g. embed_dim not divisible by num_heads)
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch_mha = None
    if mha.num_kv_heads == H:  # nn.MultiheadAttention has no GQA; otherwise take its weights to compare at the end
        torch_mha = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=True).eval()
        mha = MultiHeadAttention.from_torch(torch_mha, impl=args.impl)
    mha.eval()
    query = torch.randn(B, L, E)
    key = query if S == L and kdim == E else torch.randn(B, S, kdim)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[-1, S - args.pad:] = True  # the last sequence is shorter: its trailing keys are padding
    need_weights = args.impl == "math"
    (out, weights), steps = record_steps(lambda: mha(query, key, key, key_padding_mask=padding,
                                                     is_causal=not args.no_causal, need_weights=need_weights,
                                                     average_attn_weights=False))

    print(f"B={B} batch, L={L} query tokens, S={S} key tokens, E={E} embed_dim, kdim={kdim}, H={H} heads, "
          f"H_kv={mha.num_kv_heads} K/V heads, D=E/H={mha.head_dim}; causal={not args.no_causal}, "
          f"key_padding_mask hides the last {args.pad} key(s) of batch {B - 1}, impl={args.impl}\n")
    print_steps(steps)

    print("\nwhere the FLOPs go (multiply-adds x 2), for one forward:")
    kv = mha.num_kv_heads * mha.head_dim
    for name, shapes, flops, meaning in (
        ("q_proj", "(B·L, E) @ (E, E)", 2 * B * L * E * E, "linear in L"),
        ("k_proj, v_proj", f"(B·S, kdim) @ (kdim, {kv})", 2 * 2 * B * S * kdim * kv, "linear in S"),
        ("Q Kᵀ", "(B, H, L, D) @ (B, H, D, S)", 2 * B * H * L * S * mha.head_dim, "L·S: quadratic for L = S = T"),
        ("weights V", "(B, H, L, S) @ (B, H, S, D)", 2 * B * H * L * S * mha.head_dim, "L·S: quadratic"),
        ("out_proj", "(B·L, E) @ (E, E)", 2 * B * L * E * E, "linear in L"),
    ):
        print(f"  {name:<15} {shapes:<30} {flops:>10,d}  {meaning}")

    if weights is not None:
        print(f"\nattention weights of batch {B - 1}, head 0 (row = query, column = key; rows sum to 1):")
        print(textwrap.indent(str(weights[-1, 0].detach().numpy().round(2)), "  "))
    if torch_mha is not None:
        future = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1) if not args.no_causal else None  # (L, S)
        expected, _ = torch_mha(query, key, key, key_padding_mask=padding, attn_mask=future, need_weights=False)
        print(f"\nnn.MultiheadAttention on the same weights and masks: max |ours - torch| = "
              f"{(out - expected).abs().max():.2e}")
    if args.decode:  # generation: the prompt's K/V are cached, the next token only brings its own q, k, v
        cache = KVCache()
        mha(query, query, query, key_padding_mask=padding, is_causal=True, kv_cache=cache)
        token = torch.randn(B, 1, E)  # (B, 1, E)
        decode_padding = torch.cat([padding, torch.zeros(B, 1, dtype=torch.bool)], dim=1)  # (B, S + 1): new key is real
        print(f"\none decode step: {len(cache)} tokens cached, 1 new token (L = 1, S = {len(cache) + 1})")
        print_steps(record_steps(lambda: mha(token, token, token, key_padding_mask=decode_padding, is_causal=True,
                                             kv_cache=cache))[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
