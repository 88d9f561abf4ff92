"""What serving through serve.py's OpenAI API costs: time to first token (TTFT) and tokens/s of a streamed
/v1/chat/completions request against calling model.generate() directly on the same prompt, same model, same
process, interleaved, greedy (both produce the same tokens, which is checked).

    python phase2_lora/benchmark_serve.py --adapter checkpoints/qwen1.5-1.8b-persona-lora   # the real thing, GPU
    # CPU smoke test of the code path: Qwen's real tokenizer on a tiny random body
    python phase2_lora/make_tiny_model.py --tokenizer qwen --output_dir checkpoints/tiny-qwen-real
    python phase2_lora/benchmark_serve.py --model_name_or_path checkpoints/tiny-qwen-real --max_tokens 64

Baseline ("direct"): apply_chat_template + model.generate(), as a user calling transformers would, in a thread
like the server's; its TTFT is generate(max_new_tokens=1) (prefill + first token). API: the server (uvicorn, in
a thread of this process) receiving the request over localhost HTTP; TTFT = until the first content event
arrives (the server sends each token's text the moment it is complete UTF-8: one token, unless the first is only
part of a character), tokens/s = completion tokens / time until `data: [DONE]`. Figures are medians over
--repeats; each direct TTFT is measured right before the API request it is compared to.
"""

import argparse
import http.client
import json
import statistics
import sys
import threading
import time

from chat import OneLineArgumentParser, add_model_flags, check_model_args, die, log
from model_names import resolve_model


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--question", default="请用三句话介绍一下你自己。", help="the user message (default: %(default)s)")
    p.add_argument("--max_tokens", type=int, default=128, help="tokens per answer (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="measurements per side (default: %(default)s)")
    args = p.parse_args(argv)
    if args.max_tokens < 1 or args.repeats < 1:
        die("--max_tokens and --repeats must be >= 1")
    args.greedy, args.max_new_tokens = True, args.max_tokens
    return args


def direct(server, messages, max_tokens: int) -> tuple[float, list[int]]:
    """(seconds, generated ids) of apply_chat_template + generate(), greedy, in a fresh thread as the server runs
    it: on a CPU shared by other jobs, OpenMP in the main thread was measured up to 18x slower on the same call."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=_direct(server, messages, max_tokens)))
    thread.start()
    thread.join()
    return result["out"]


def _direct(server, messages, max_tokens: int) -> tuple[float, list[int]]:
    import torch
    from chat_session import encode_chat, generation_kwargs

    start = time.perf_counter()
    input_ids = encode_chat(server.tokenizer, messages).to(server.model.device)  # (1, T)
    kwargs = generation_kwargs(max_tokens, server.stop_ids, server.tokenizer.pad_token_id, greedy=True)
    with torch.inference_mode():
        out = server.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[0, input_ids.shape[1]:].tolist()


def through_api(port: int, messages, max_tokens: int) -> tuple[float, float, str, int]:
    """(TTFT, total seconds, text, completion tokens) of one streamed request."""
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port)
    start, first, text, tokens = time.perf_counter(), None, "", 0
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text += chunk["choices"][0]["delta"]["content"]
    total = time.perf_counter() - start
    conn.close()
    return first - start, total, text, tokens


def start_server(server):
    """serve.py's app under uvicorn in a daemon thread of this process; returns (port, uvicorn server: set its
    should_exit to stop it)."""
    import uvicorn
    from serve import create_app, listen

    sock = listen("127.0.0.1", 0)  # a free port, held from now on: no other process can take it meanwhile
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return sock.getsockname()[1], uv


def main(argv=None) -> int:
    args = parse_args(argv)
    base = check_model_args(args)
    from qlora_model import UsageError
    from serve import Server

    try:
        server = Server(args, resolve_model(base, args.hub, UsageError))  # --hub modelscope: a local folder
    except UsageError as e:
        die(str(e))
    port, _ = start_server(server)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.question})
    through_api(port, messages, args.max_tokens)  # warm-up: first-call allocations, kernel choices
    direct(server, messages, args.max_tokens)
    rows = {"direct_ttft": [], "direct_total": [], "api_ttft": [], "api_total": []}
    for i in range(args.repeats):  # interleaved, so drifting machine load hits both sides alike
        rows["direct_ttft"].append(direct(server, messages, 1)[0])  # right before the API request it is compared to
        ttft, total, text, tokens = through_api(port, messages, args.max_tokens)
        rows["api_ttft"].append(ttft)
        rows["api_total"].append(total)
        seconds, ids = direct(server, messages, args.max_tokens)
        rows["direct_total"].append(seconds)
        # usage counts the tokens of the text: an end-of-turn token that ended the answer is not among them
        if text != server.tokenizer.decode(ids, skip_special_tokens=True) or tokens != len(ids) - (
                ids[-1] in server.stop_ids):
            die(f"the API answered differently from generate() (repeat {i}): not the same computation")
        log(f"[{i + 1}/{args.repeats}] direct {seconds:.3f} s, API {total:.3f} s, {tokens} tokens")
    med = {k: statistics.median(v) for k, v in rows.items()}
    n = len(ids)
    ttft_ratio = med["api_ttft"] / med["direct_ttft"]
    tps_direct, tps_api = n / med["direct_total"], n / med["api_total"]
    print(f"model {server.model_id} on {server.model.device}, {n} tokens per answer, median of {args.repeats}")
    print("| | direct generate() | API, streamed | API / direct |\n|---|---|---|---|")
    print(f"| time to first token | {med['direct_ttft'] * 1e3:.1f} ms | {med['api_ttft'] * 1e3:.1f} ms "
          f"| {ttft_ratio:.3f} |")
    print(f"| tokens/s | {tps_direct:.1f} | {tps_api:.1f} | {tps_api / tps_direct:.3f} |")
    # On a shared machine the load drifts between repeats: the median of each repeat's own ratio (its direct TTFT
    # was measured right before its API request) is steadier than the ratio of the two medians
    paired = statistics.median(a / d for a, d in zip(rows["api_ttft"], rows["direct_ttft"], strict=True))
    print(f"overhead: TTFT {100 * (ttft_ratio - 1):+.1f}% (median of paired ratios {100 * (paired - 1):+.1f}%), "
          f"tokens/s {100 * (1 - tps_api / tps_direct):+.1f}% (goal: <= 10%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
