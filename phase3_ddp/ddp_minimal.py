"""DDP by hand: the LoRA fine-tune that the HF Trainer runs inside phase2_lora/qlora_minimal.py, with the Trainer's
loop written out, on W processes ("ranks") that each hold a full replica and read 1/W of every batch.

    python phase2_lora/make_tiny_model.py --output_dir checkpoints/tiny-qwen
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 phase3_ddp/ddp_minimal.py --model_name_or_path checkpoints/tiny-qwen \
        --data_path data/persona_zh.json --max_samples 8 --batch_size 4 --max_steps 60 --lr 1e-2 \
        --output_dir checkpoints/tiny-lora-ddp-minimal

Read top to bottom: process group -> data (chat template, answer-only labels, padding) -> model (NF4 + LoRA) -> DDP
-> AdamW -> loop -> rank 0 saves the adapter. Every line a single-process loop would not have is marked "DDP:".
Left out of the Trainer's loop, kept in the tool version finetune_ddp.py (phase3_ddp/README.md says why): gradient
accumulation under no_sync(), clipping, the learning-rate schedule, evaluation, checkpoints and resume.
tests/acceptance/test_grade_ddp_minimal.py grades this file or your rewrite of it.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.utils import logging as hf_logging

MAX_LEN = 512            # tokens; the few longer records are dropped
LORA_R, LORA_ALPHA = 16, 32  # the update is (alpha / r) B A
LORA_DROPOUT = 0.0       # dropout masks differ per rank: with dropout, 2 ranks could not equal 1 process exactly
SEED = 42                # the same on every rank: the same shuffle, the same LoRA init
IGNORE = -100            # label that cross_entropy skips: prompt tokens and padding


def parse_args():
    p = argparse.ArgumentParser(description="LoRA fine-tuning as a hand-written DDP loop (launch with torchrun)")
    p.add_argument("--model_name_or_path", default="Qwen/Qwen1.5-1.8B-Chat")
    p.add_argument("--data_path", default="data/alpaca_data_cleaned.json", help="Alpaca JSON list")
    p.add_argument("--output_dir", default="checkpoints/ddp-minimal")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per step PER RANK")
    p.add_argument("--max_steps", type=int, default=100, help="optimizer steps (epochs repeat as needed)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max_samples", type=int, default=None, help="use only the first N records")
    return p.parse_args()


def tokenize(record: dict, tokenizer) -> dict:
    """An Alpaca record -> input_ids and labels, as qlora_minimal.py makes them: the chat template (exactly as chat.py
    renders the question), -100 on the prompt (the model is not trained to write questions), the answer and its
    <|im_end|> as targets (so the model learns to stop), nothing after <|im_end|>."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    chat = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    # tokenised apart from the prompt: in one text an answer starting with "\n" would merge with the prompt's last "\n"
    answer = tokenizer(record["output"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Pad a batch on the right to its longest example. Causal attention never looks right, so padding after the
    real tokens changes none of their logits; attention_mask = 0 and label IGNORE keep it out of attention and loss."""
    T = max(len(ex["input_ids"]) for ex in examples)
    batch = {"input_ids": torch.full((len(examples), T), pad_id),      # (B, T)
             "attention_mask": torch.zeros(len(examples), T, dtype=torch.long),
             "labels": torch.full((len(examples), T), IGNORE)}
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(ex["input_ids"])
        batch["labels"][i, :n] = torch.tensor(ex["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


def main():
    args = parse_args()
    if not sys.stderr.isatty():  # a log file gets plain lines, not tqdm's \r progress bars
        hf_logging.disable_progress_bar()
    # DDP: torchrun starts W copies of this script and gives each RANK, LOCAL_RANK, WORLD_SIZE and the address of
    # rank 0 (MASTER_ADDR/PORT); init_process_group meets the others there. NCCL talks between GPUs, gloo between CPUs.
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # DDP: one GPU per process, picked by its rank on this machine

    # ---- data: every rank tokenises the same records; the sampler decides who reads which
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    with open(args.data_path, encoding="utf-8") as f:
        records = json.load(f)[:args.max_samples]
    data = [ex for ex in (tokenize(r, tokenizer) for r in records) if len(ex["input_ids"]) <= MAX_LEN]
    # DDP: DistributedSampler shuffles all indices with seed + epoch (the same permutation on every rank) and gives
    # rank r the indices r, r + W, r + 2W, ...: each step the W ranks read W disjoint batches, which together are
    # the batch of W x batch_size that one process would read. (It repeats a few examples if len % W != 0.)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=SEED)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=lambda ex: collate(ex, tokenizer.pad_token_id))

    # ---- model: QLoRA = frozen base in 4-bit NF4 (de-quantised per matmul) + small trainable LoRA matrices
    dtype = torch.bfloat16 if cuda else torch.float32  # the dtype the matmuls run in
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device})  # the whole model on `device`
    # Freezes the base, casts norms and embeddings to fp32, turns on gradient checkpointing. Non-reentrant: its
    # recomputation is plain autograd, so each LoRA weight's gradient hook fires once per backward, as DDP expects.
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    # DDP: the same seed gives every rank the same LoRA init (and DDP copies rank 0's weights to the others anyway)
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    # DDP: the wrapper broadcasts rank 0's weights once, then in every backward all-reduces (averages) the gradients
    # of the trainable (LoRA) parameters, overlapped with the backward itself: every replica takes the same step.
    ddp_model = DDP(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    # ---- train
    model.train()
    step, epoch = 0, 0
    while step < args.max_steps:
        sampler.set_epoch(epoch)  # DDP: a new shuffle each epoch; without it every epoch reads epoch 0's order
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = ddp_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # position t predicts token t + 1: drop the last logit and the first label
            logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]       # (B, T-1, V), (B, T-1)
            ce_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            # DDP: the loss we want is the mean over every answer token of the GLOBAL batch, but ranks hold different
            # numbers of answer tokens. Sum the counts over ranks (N), divide this rank's summed CE by N / W: DDP
            # averages the gradients over W ranks, which leaves d(all ranks' CE) / N, one process's gradient.
            n_tokens = (targets != IGNORE).sum()
            dist.all_reduce(n_tokens)  # SUM over ranks, in place
            loss = ce_sum * world / n_tokens
            optimizer.zero_grad(set_to_none=True)
            # DDP: backward all-reduces the gradients, bucket by bucket, while it runs
            loss.backward()
            optimizer.step()
            step += 1
            summed = ce_sum.detach()
            dist.all_reduce(summed)  # DDP: all ranks' CE, so the printed loss is the global token mean
            if rank == 0:  # DDP: one rank prints; W copies of each line would garble the log
                print(f"step {step} loss {summed.item() / n_tokens.item():.4f}", flush=True)
            if step == args.max_steps:
                break
        epoch += 1

    if rank == 0:  # DDP: the replicas are identical; one writer. (model is the PeftModel inside ddp_model.module)
        model.save_pretrained(args.output_dir)  # adapter_config.json + adapter_model.safetensors (LoRA only)
        tokenizer.save_pretrained(args.output_dir)
        print(f"adapter -> {args.output_dir}")
    dist.barrier()  # DDP: nobody tears the group down while rank 0 still writes
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
