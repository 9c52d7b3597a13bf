"""Which CTC targets teach the micro audio encoder to hear? Variants side by side on one GPU (a probe).

    python scripts/micro_ctc_probe.py WORK OUT_JSON [--seconds 240] [--variants a,b] [--device cuda]

Generates (or reuses) the micro train/test data in WORK, builds the micro init checkpoint, precomputes the
log-mels of every ASR clip once, then trains each variant's audio encoder + a CTC head in its own process (all
at once: the model is tiny) for the same wall time, scoring held-out clips (test split, unseen sentences) as it
goes: CTC loss per target token and greedy word error rate. Prints a table and writes every curve to OUT_JSON.
Targets are either the decoder's tokens (whole words: what the recipe's speech-ctc stage uses) or a small BPE
over characters trained on the training transcripts (units shared across words).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name: (targets, lr, clips per batch, autocast bf16, warmup steps)
VARIANTS = {
    "word-1e3": ("word", 1e-3, 32, True, 100),
    "word-1e3-fp32": ("word", 1e-3, 32, False, 100),
    "word-3e3": ("word", 3e-3, 32, True, 100),
    "word-1e3-b8": ("word", 1e-3, 8, True, 100),
    "cbpe-1e3": ("cbpe", 1e-3, 32, True, 100),
    "cbpe-3e3": ("cbpe", 3e-3, 32, True, 100),
}
CBPE_VOCAB = 96  # letters + frequent pieces: ~2-3 characters a unit, so a sentence fits its 80 ms frames


def _feats(data: Path) -> tuple[list[torch.Tensor], list[str]]:
    recs = [json.loads(line) for line in open(data / "asr.jsonl")]
    paths = [str(data / r["messages"][0]["content"][0]["audio_url"]["url"]) for r in recs]
    with mp.get_context("spawn").Pool(16) as pool:
        mels = pool.map(_mel, paths, chunksize=32)
    return [torch.from_numpy(m) for m in mels], [r["messages"][1]["content"] for r in recs]


def _mel(path: str):
    from phi4mm.inputs.audio import load_audio, log_mel
    return log_mel(load_audio(path))


def _cbpe(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=CBPE_VOCAB, show_progress=False))
    return tok


def _wer(ref: str, hyp: str) -> tuple[int, int]:
    r, h = ref.split(), hyp.split()
    d = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, d[0] = d[0], i
        for j, hw in enumerate(h, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (rw != hw))
    return d[len(h)], len(r)


def _variant(name: str, ckpt: str, feats_file: str, device: str, seconds: float, out: str) -> None:
    from phi4mm import api
    kind, lr, bsz, amp, warm = VARIANTS[name]
    torch.manual_seed(0)
    d = torch.load(feats_file)
    m = api.load(ckpt, device, "float32")
    if kind == "word":
        enc_fn = lambda s: m.tokenizer.encode(s)  # noqa: E731
        dec_fn = m.tokenizer.decode
        vocab = m.config.text.vocab_size
    else:
        cb = _cbpe(d["train_text"])
        enc_fn = lambda s: cb.encode(s).ids  # noqa: E731
        dec_fn = lambda ids: cb.decode(ids)  # noqa: E731
        vocab = cb.get_vocab_size()
    tr = [(f, enc_fn(t), t) for f, t in zip(d["train"], d["train_text"])]
    te = [(f, enc_fn(t), t) for f, t in zip(d["test"], d["test_text"])]
    enc = m.net.audio
    enc.train()
    head = torch.nn.Linear(m.config.audio.hidden_size, vocab + 1, device=device)
    params = list(enc.encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(0)

    def run(items, train: bool):
        T = max(f.shape[0] for f, _, _ in items)
        x = torch.stack([F.pad(f, (0, 0, 0, T - f.shape[0])) for f, _, _ in items]).to(device)  # (B, T, 80)
        lens = torch.tensor([f.shape[0] for f, _, _ in items], device=device)
        with torch.autocast("cuda", torch.bfloat16, enabled=amp and device.startswith("cuda")):
            h, tl = enc.encode(x, lens)  # (B, T', D)
            logp = F.log_softmax(head(h).float(), -1)  # (B, T', V + 1)
        flat = torch.tensor([t for _, ts, _ in items for t in ts], device=device)
        tls = torch.tensor([len(ts) for _, ts, _ in items], device=device)
        loss = F.ctc_loss(logp.transpose(0, 1), flat, tl, tls, blank=vocab, reduction="sum", zero_infinity=True)
        return loss, tls.sum(), logp, tl

    def evaluate():
        enc.eval()
        tot, n, errs, words = 0.0, 0, 0, 0
        with torch.no_grad():
            for i in range(0, len(te), 50):
                items = te[i:i + 50]
                loss, ntok, logp, tl = run(items, False)
                tot, n = tot + loss.item(), n + ntok.item()
                for row, k, (_, _, text) in zip(logp.argmax(-1).tolist(), tl.tolist(), items):
                    row = row[:k]
                    ids = [t for j, t in enumerate(row) if t != vocab and (j == 0 or t != row[j - 1])]
                    e, w = _wer(text, dec_fn(ids))
                    errs, words = errs + e, words + w
        enc.train()
        return tot / n, errs / words

    curve, hist, step, t0 = [], [], 0, time.time()
    ratio = sum(len(ts) for _, ts, _ in tr) / sum(-(-f.shape[0] // 8) for f, _, _ in tr)
    while time.time() - t0 < seconds:
        idx = torch.randint(0, len(tr), (bsz,), generator=gen).tolist()
        loss, ntok, _, _ = run([tr[i] for i in idx], True)
        loss = loss / ntok
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        opt.step()
        hist.append(loss.item())
        step += 1
        if step % 250 == 0:
            tl_, wer = evaluate()
            curve.append({"step": step, "s": round(time.time() - t0, 1), "train": round(sum(hist[-250:]) / 250, 3),
                          "heldout": round(tl_, 3), "wer": round(wer, 3)})
            print(name, curve[-1], flush=True)
    tl_, wer = evaluate()
    res = {"variant": name, "steps": step, "targets_per_frame": round(ratio, 3), "final_heldout": round(tl_, 3),
           "final_wer": round(wer, 3), "curve": curve}
    Path(out).write_text(json.dumps(res))


def prepare_work(work: Path, scale: float = 1.0) -> Path:
    """The recipe's micro data (train seed 0, test seed 1000) and init checkpoint in `work` (reused when there)."""
    from phi4mm.micro import data as micro_data
    from phi4mm.micro import init as micro_init
    for split, seed in (("train", 0), ("test", 1000)):
        if not (work / split / "done").is_file():
            micro_data.generate(work / split, split, seed, scale=scale, progress=False)
            (work / split / "done").write_text("")
    ckpt = work / "init"
    if not (ckpt / "config.json").is_file():
        micro_init.init_checkpoint(ckpt, work / "train", 0)
    return ckpt


def prepare_probe(work: Path, scale: float, name: str, load, suffix: str) -> tuple[Path, Path]:
    """prepare_work, then the probe's inputs cached in work/name: load(split_dir) -> (tensor, texts) for the
    train and test splits, stored as train / train_{suffix} / test / test_{suffix}. Returns (init, cache)."""
    t = time.time()
    ckpt = prepare_work(work, scale)
    path = work / name
    if not path.is_file():
        tr, trt = load(work / "train")
        te, tet = load(work / "test")
        torch.save({"train": tr, f"train_{suffix}": trt, "test": te, f"test_{suffix}": tet}, path)
    print(f"data + init + {name}: {time.time() - t:.0f} s", flush=True)
    return ckpt, path


def probe_args(variants: dict) -> argparse.ArgumentParser:
    """The probes' shared command line: WORK OUT_JSON, seconds per variant, which variants, device, data scale."""
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("out")
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--variants", default=",".join(variants))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scale", type=float, default=1.0)
    return ap


def run_variants(target, names: list[str], prefix: Path, args) -> list[dict]:
    """target(*args(name, out_json)) for every variant at once, one spawned process each; their results."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args(n, f"{prefix}-{n}.json")) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [json.loads(Path(f"{prefix}-{n}.json").read_text()) for n in names if Path(f"{prefix}-{n}.json").is_file()]


def main() -> None:
    a = probe_args(VARIANTS).parse_args()
    work = Path(a.work)
    ckpt, feats_file = prepare_probe(work, a.scale, "feats.pt", _feats, "text")
    results = run_variants(_variant, a.variants.split(","), work / "probe",
                           lambda n, out: (n, str(ckpt), str(feats_file), a.device, a.seconds, out))
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"{'variant':16} {'steps':>6} {'tgt/frame':>9} {'heldout':>8} {'WER':>6}")
    for r in results:
        print(f"{r['variant']:16} {r['steps']:6d} {r['targets_per_frame']:9.3f} {r['final_heldout']:8.3f} "
              f"{r['final_wer']:6.3f}")


if __name__ == "__main__":
    main()
