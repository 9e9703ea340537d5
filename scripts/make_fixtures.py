#!/usr/bin/env python3
"""Generate golden reference fixtures from llama.cpp (as vendored in
llama-cpp-python==0.3.36) into tests/fixtures/.

Run it with the venv created by scripts/build_llama_cpp.sh:

    scripts/build_llama_cpp.sh
    source ~/.cache/lmap/llama.cpp-0.3.36/env.sh
    $LMAP_LLAMA_PY scripts/make_fixtures.py [--models-dir /work/cache/models] [--out tests/fixtures]

Only the low-level ctypes API (llama_cpp.llama_cpp) is used, so what is
recorded is exactly what libllama returns: llama_tokenize, llama_token_to_piece,
llama_detokenize, llama_decode + llama_get_logits_ith.

Files written:
  tokenizer_smollm2.json, tokenizer_gemma3.json  -- tokenizer cases
  greedy_smollm2.json,    greedy_gemma3.json     -- greedy decoding + top-8 logits
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np

if "LLAMA_CPP_LIB_PATH" not in os.environ:
    _d = Path(os.environ.get("LMAP_LLAMA_CPP_DIR", Path.home() / ".cache/lmap/llama.cpp-0.3.36"))
    os.environ["LLAMA_CPP_LIB_PATH"] = str(_d / "build" / "bin")

import llama_cpp  # noqa: E402
import llama_cpp.llama_cpp as L  # noqa: E402

LLAMA_CPP_COMMIT = os.environ.get("LMAP_LLAMA_CPP_COMMIT", "0c1e57098")
N_CTX = 2048
N_BATCH = 512
N_THREADS = 2
N_GEN = 64
TOPK = 8
MARGIN_THRESHOLD = 0.15

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}

# --------------------------------------------------------------------------
# tokenizer test strings
# --------------------------------------------------------------------------
COMMON_STRINGS: list[str] = [
    # empty / whitespace
    "",
    " ",
    "  ",
    "   ",
    "    ",
    "     ",
    "Hello world",
    " Hello world",
    "Hello world ",
    "  leading two spaces",
    "trailing three spaces   ",
    "a  b   c    d     e",
    "\n",
    "line one\nline two",
    "\n\n\n",
    "para one\n\n\npara two\n",
    "\t",
    "col1\tcol2\t\tcol3",
    " \t \n \r\n mixed \t\n",
    # digits
    "1",
    "12",
    "123",
    "1234",
    "12345678",
    "3.14159",
    "1,000,000",
    "The year 2024 had 366 days and 8784 hours.",
    # punctuation
    "Hello, world! How are you?",
    "...!!!???;;;:::---",
    "!!!!!!!!",
    "================",
    "aaaaaaaaaaaaaaaa",
    "(a[b]{c}<d>)",
    # contractions / case
    "don't",
    "I'M sure they're here and we'll see; you've 'quoted' it.",
    "DON'T SHOUT, I'd say I'll go",
    # code
    'def add(a, b):\n    """Add two numbers."""\n    if a > b:\n        return a + b\n    return b + a\n',
    '#include <iostream>\nint main() {\n\tstd::cout << "hi" << std::endl;\n\treturn 0;\n}\n',
    '{"name": "lmap", "version": [0, 1], "ok": true, "n": null}',
    # URLs / email
    "Visit https://www.example.com/path/to/page?query=1&x=y#frag now",
    "mail me at john.doe+test@example.co.uk",
    # scripts
    "你好，世界！今天天气很好。",
    "こんにちは、世界。カタカナとひらがな。",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир! Как дела?",
    "Γειά σου Κόσμε",
    # emoji
    "I love 🦙 and 🤗!",
    "👨‍👩‍👧‍👦 family",
    "flags 🇫🇷🇯🇵🇺🇸",
    "👍🏽 👋🏿 skin tones",
    # accents / combining
    "café naïve Ångström résumé",
    "cafe\u0301 n\u0303 a\u0308\u0304",
    "Zürich, São Paulo, Kraków, Reykjavík",
    # misc
    '<html><body class="x">&amp;</body></html>',
    "Mixed: English, 中文, русский, 🎉, 123!",
]

SPECIAL_STRINGS = {
    "smollm2": [
        "<|im_start|>user\nhi<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
        "text<|im_end|>more",
    ],
    "gemma3": [
        "<start_of_turn>user\nhi<end_of_turn>\n",
        "<bos>",
        "<bos><start_of_turn>model\nHello!<end_of_turn>",
        "text<end_of_turn>more",
    ],
}

# --------------------------------------------------------------------------
# greedy prompts
# --------------------------------------------------------------------------
LONG_PROSE = (
    "The history of computing is a story of steady abstraction. In the earliest days, "
    "programmers wired circuits by hand and wrote instructions as raw numbers, keeping "
    "careful notebooks so that they could remember which switch controlled which register. "
    "Each new layer, from assembly language to compilers to operating systems, allowed people "
    "to think less about the machine and more about the problem they wanted to solve.\n\n"
    "By the nineteen seventies, high-level languages such as C made it possible to write "
    "software that could be moved from one computer to another with modest effort. Universities "
    "began teaching programming as a discipline of its own, and small companies started selling "
    "software rather than hardware. The personal computer arrived a few years later, bringing "
    "spreadsheets, word processors and games into ordinary homes and offices.\n\n"
    "The internet changed the picture again. Suddenly, programs were no longer isolated tools "
    "but services that talked to each other across continents. Engineers had to learn about "
    "latency, reliability and security, and they invented new ways of organizing large teams "
    "and enormous code bases. Open source projects showed that thousands of volunteers could "
    "build software together without ever meeting in person.\n\n"
    "Today, machine learning models are the newest layer of abstraction. Instead of writing "
    "every rule explicitly, developers collect examples and let an algorithm discover the "
    "patterns. Small language models can now run on a laptop, answering questions, summarizing "
    "documents and writing code. Looking back over this long history, the most important "
    "lesson is"
)

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
QUESTION = "What is the tallest mountain in the world?"


def prompts_for(key: str) -> list[dict]:
    if key == "smollm2":
        chat = (
            f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
            f"<|im_start|>assistant\n"
        )
    else:
        # gemma3 template: BOS (added by the tokenizer, add_bos=true) + turns
        chat = f"<start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"
    return [
        {"name": "plain", "text": "The capital of France is"},
        {"name": "chat", "text": chat},
        {"name": "code", "text": "def fibonacci(n):\n"},
        {"name": "long_prose", "text": LONG_PROSE},
        {"name": "list", "text": "Here is a list of fruits:\n1."},
        {"name": "story", "text": "Once upon a time, in a small village,"},
    ]


# --------------------------------------------------------------------------
# thin wrappers over the ctypes API
# --------------------------------------------------------------------------
_LOG_CB = None


def quiet_logs() -> None:
    global _LOG_CB

    @L.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001
        pass

    _LOG_CB = _cb
    L.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Model:
    def __init__(self, path: Path):
        self.path = path
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"failed to load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.add_eos = bool(L.llama_vocab_get_add_eos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        self.eos = int(L.llama_vocab_eos(self.vocab))
        self.eot = int(L.llama_vocab_eot(self.vocab))

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 16
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            arr = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, add_special, parse_special)
        assert n >= 0, n
        return [int(arr[i]) for i in range(n)]

    def piece(self, tok: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, tok, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, ids: list[int], remove_special: bool = False, unparse_special: bool = True) -> bytes:
        arr = (L.llama_token * max(1, len(ids)))(*ids)
        cap = 64 + 32 * len(ids)
        buf = ctypes.create_string_buffer(cap)
        n = L.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = L.llama_detokenize(self.vocab, arr, len(ids), buf, cap, remove_special, unparse_special)
        return buf.raw[:n]

    def new_context(self):
        cp = L.llama_context_default_params()
        cp.n_ctx = N_CTX
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_BATCH
        cp.n_seq_max = 1
        cp.n_threads = N_THREADS
        cp.n_threads_batch = N_THREADS
        cp.no_perf = True
        ctx = L.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama_init_from_model failed")
        return ctx, cp

    def close(self):
        L.llama_model_free(self.model)


def decode(ctx, tokens: list[int], pos0: int, logits_all: bool) -> None:
    n = len(tokens)
    batch = L.llama_batch_init(n, 0, 1)
    try:
        batch.n_tokens = n
        for i, t in enumerate(tokens):
            batch.token[i] = t
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if (logits_all or i == n - 1) else 0
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
    finally:
        L.llama_batch_free(batch)


def logits_row(ctx, i: int, n_vocab: int) -> np.ndarray:
    ptr = L.llama_get_logits_ith(ctx, i)
    return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32, copy=True)


def summarize(row: np.ndarray) -> dict:
    top = np.argsort(-row, kind="stable")[:TOPK]
    am = int(np.argmax(row))
    return {
        "id": am,
        "margin": round(float(row[top[0]] - row[top[1]]), 5),
        "top8": [[int(t), round(float(row[t]), 5)] for t in top],
    }


# --------------------------------------------------------------------------
# fixture builders
# --------------------------------------------------------------------------
def _is_flat(v) -> bool:
    """Scalars, or lists of scalars / short lists of scalars (e.g. [id, logit])."""
    if isinstance(v, (dict,)):
        return False
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) or (isinstance(x, list) and _is_flat(x)) for x in v)
    return True


def dumps(v, indent: int = 0) -> str:
    """JSON with one line per leaf list (ids, top8, ...) to keep fixtures small and diffable."""
    if _is_flat(v):
        return json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    if isinstance(v, dict) and all(_is_flat(x) for x in v.values()):
        one = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        if len(one) <= 240:
            return one
    pad = " " * (indent + 1)
    if isinstance(v, dict):
        items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {dumps(x, indent + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [f"{pad}{dumps(x, indent + 1)}" for x in v]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def generator_info(argv: list[str]) -> dict:
    return {
        "tool": "scripts/make_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "llama_cpp_source": "vendor/llama.cpp from the llama_cpp_python-0.3.36 sdist (PyPI)",
        "build": "scripts/build_llama_cpp.sh (cmake Release, GGML_NATIVE=ON, BUILD_SHARED_LIBS=ON, CPU only)",
        "system_info": L.llama_print_system_info().decode("utf-8", "replace").strip(),
        "machine": platform.machine(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + argv),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def model_info(m: Model, path: Path, sha: str) -> dict:
    return {
        "file": path.name,
        "sha256": sha,
        "arch": m.meta("general.architecture"),
        "tokenizer_model": m.meta("tokenizer.ggml.model"),
        "tokenizer_pre": m.meta("tokenizer.ggml.pre"),
        "n_vocab": m.n_vocab,
        "add_bos": m.add_bos,
        "add_eos": m.add_eos,
        "bos_id": m.bos,
        "eos_id": m.eos,
        "eot_id": m.eot,
    }


def tokenizer_fixture(key: str, m: Model, path: Path, sha: str, argv: list[str]) -> dict:
    strings = COMMON_STRINGS + SPECIAL_STRINGS[key]
    cases = []
    for text in strings:
        case = {"text": text, "add_special": True}
        for mode, ps in (("plain", False), ("special", True)):
            ids = m.tokenize(text, add_special=True, parse_special=ps)
            pieces = [m.piece(t, special=True) for t in ids]
            concat = b"".join(pieces)
            detok = m.detokenize(ids, remove_special=False, unparse_special=True)
            case[mode] = {
                "parse_special": ps,
                "ids": ids,
                "pieces_hex": [p.hex() for p in pieces],
                "detok": concat.decode("utf-8", errors="replace"),
                "detok_hex": concat.hex(),
                "llama_detokenize": detok.decode("utf-8", errors="replace"),
                "llama_detokenize_hex": detok.hex(),
            }
        cases.append(case)
    return {
        "generator": generator_info(argv),
        "model": model_info(m, path, sha),
        "notes": (
            "ids = llama_tokenize(text, add_special=True, parse_special=<mode>); llama.cpp adds "
            "BOS only if the model's metadata says so (model.add_bos). pieces = llama_token_to_piece"
            "(id, lstrip=0, special=True); detok = concatenated pieces decoded with errors='replace'; "
            "llama_detokenize = llama_detokenize(ids, remove_special=False, unparse_special=True)."
        ),
        "cases": cases,
    }


def greedy_fixture(key: str, m: Model, path: Path, sha: str, argv: list[str]) -> tuple[dict, dict]:
    out_prompts = []
    tot = {"n": 0, "agree": 0, "n_conf": 0, "agree_conf": 0}
    cparams_rec = None
    for p in prompts_for(key):
        ids = m.tokenize(p["text"], add_special=True, parse_special=True)
        assert len(ids) + N_GEN <= N_BATCH, (p["name"], len(ids))
        # --- one by one: prompt in one batch, then one token at a time
        ctx, cp = m.new_context()
        cparams_rec = {
            "n_ctx": cp.n_ctx,
            "n_batch": cp.n_batch,
            "n_ubatch": cp.n_ubatch,
            "n_threads": cp.n_threads,
            "n_threads_batch": cp.n_threads_batch,
            "flash_attn_type": cp.flash_attn_type,
            "type_k": cp.type_k,
            "type_v": cp.type_v,
        }
        steps = []
        gen: list[int] = []
        decode(ctx, ids, 0, logits_all=False)
        for s in range(N_GEN):
            row = logits_row(ctx, -1, m.n_vocab)
            info = summarize(row)
            steps.append(info)
            gen.append(info["id"])
            if s + 1 < N_GEN:
                decode(ctx, [info["id"]], len(ids) + s, logits_all=False)
        L.llama_free(ctx)

        # --- whole sequence in one batch, logits for every position
        full = ids + gen
        ctx, _ = m.new_context()
        decode(ctx, full, 0, logits_all=True)
        batched = []
        for s in range(N_GEN):
            pos = len(ids) - 1 + s
            row = logits_row(ctx, pos, m.n_vocab)
            top = np.argsort(-row, kind="stable")[:2]
            batched.append(
                {
                    "pos": pos,
                    "id": int(np.argmax(row)),
                    "margin": round(float(row[top[0]] - row[top[1]]), 5),
                }
            )
        L.llama_free(ctx)

        n_agree = sum(a["id"] == b["id"] for a, b in zip(steps, batched, strict=True))
        conf = [(a, b) for a, b in zip(steps, batched, strict=True) if a["margin"] >= MARGIN_THRESHOLD]
        n_agree_conf = sum(a["id"] == b["id"] for a, b in conf)
        tot["n"] += N_GEN
        tot["agree"] += n_agree
        tot["n_conf"] += len(conf)
        tot["agree_conf"] += n_agree_conf

        text = b"".join(m.piece(t) for t in gen).decode("utf-8", errors="replace")
        eos_steps = [i for i, t in enumerate(gen) if L.llama_vocab_is_eog(m.vocab, t)]
        out_prompts.append(
            {
                "name": p["name"],
                "text": p["text"],
                "add_special": True,
                "parse_special": True,
                "prompt_ids": ids,
                "generated_ids": gen,
                "generated_text": text,
                "eog_steps": eos_steps,
                "steps": steps,
                "batched": batched,
                "batched_agreement": {
                    "n": N_GEN,
                    "agree": n_agree,
                    "n_margin_ge_thr": len(conf),
                    "agree_margin_ge_thr": n_agree_conf,
                },
            }
        )
        print(
            f"[{key}] {p['name']}: {len(ids)} prompt tokens; agree {n_agree}/{N_GEN} "
            f"(margin>={MARGIN_THRESHOLD}: {n_agree_conf}/{len(conf)})"
        )
        print("    " + repr(text[:200]))
    fx = {
        "generator": generator_info(argv),
        "model": model_info(m, path, sha),
        "params": {
            **(cparams_rec or {}),
            "n_gen": N_GEN,
            "topk": TOPK,
            "margin_threshold": MARGIN_THRESHOLD,
            "sampling": "greedy argmax over llama_get_logits_ith (numpy argmax, first index on ties); "
            "EOS/EOG does not stop generation",
        },
        "notes": (
            "steps[i] are from the sequential run: prompt decoded as one batch (logits for last token), "
            "then each chosen token decoded alone. steps[i].margin = logit[top1]-logit[top2]; top8 = "
            "[[id, logit], ...]. batched[i] are from decoding prompt_ids+generated_ids in a single "
            "batch with logits for every position, at position len(prompt_ids)-1+i (the position "
            "whose logits predict generated_ids[i])."
        ),
        "prompts": out_prompts,
    }
    return fx, tot


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", default=os.environ.get("LMAP_MODELS_DIR", "/work/cache/models"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--skip-greedy", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv[1:])

    if not args.verbose:
        quiet_logs()
    L.llama_backend_init()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    for key in args.only or list(MODELS):
        path = Path(args.models_dir) / MODELS[key]
        sha = sha256_file(path)
        m = Model(path)
        fx = tokenizer_fixture(key, m, path, sha, argv)
        dst = out / f"tokenizer_{key}.json"
        dst.write_text(dumps(fx) + "\n", encoding="utf-8")
        print(f"wrote {dst} ({len(fx['cases'])} cases)")
        if not args.skip_greedy:
            fx, tot = greedy_fixture(key, m, path, sha, argv)
            fx["batched_agreement_total"] = tot
            dst = out / f"greedy_{key}.json"
            dst.write_text(dumps(fx) + "\n", encoding="utf-8")
            rate = tot["agree_conf"] / max(1, tot["n_conf"])
            print(
                f"wrote {dst}; batched-vs-sequential argmax agreement: all {tot['agree']}/{tot['n']}, "
                f"margin>={MARGIN_THRESHOLD}: {tot['agree_conf']}/{tot['n_conf']} = {rate:.4f}"
            )
        m.close()
    L.llama_backend_free()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
