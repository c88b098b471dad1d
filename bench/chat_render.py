"""Chat rendering speed: conversations -> token ids and loss masks, per CPU core, as the data path does it.

    python bench/chat_render.py                    # 1, 8 and 32 exchanges, the demo's ChatML tokenizer
    python bench/chat_render.py --exchanges 32 --conversations 200

A conversation is a system message and N user/assistant exchanges of generated words (about 40 per
turn). It goes through `formats.renderer` (the chat format, loss on every assistant turn) and the packer,
as `data.py` renders a source; the figure is tokens per CPU-second of this one thread, best of 3.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsdistill.config import SourceConfig  # noqa: E402
from dsdistill.demo import build_tokenizer, write_corpus  # noqa: E402
from dsdistill.formats import renderer  # noqa: E402
from dsdistill.packing import Packer  # noqa: E402


def conversations(words: list[str], n: int, exchanges: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))  # noqa: E731
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": say()}]
        for _ in range(exchanges):
            msgs += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        out.append(msgs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exchanges", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--conversations", type=int, default=100)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="chat-render-"))
    write_corpus(work / "corpus.jsonl", documents=200)
    tok = build_tokenizer(work / "tok", chat=True)
    words = [w for w in tok.get_vocab() if w.isalpha()]
    source = SourceConfig(path=str(work / "corpus.jsonl"), format="chat", chat_template="chatml")
    render = renderer(source, tok, field="data", where="bench", ignore_index=-100)
    print(f"chat render + tokenise + pack, one core, {args.conversations} conversations each")
    print(f"{'exchanges':>9} {'tokens/conv':>12} {'tokens/CPU-s':>13}")
    for n in args.exchanges:
        convs = conversations(words, args.conversations, n)
        best, tokens = float("inf"), 0
        for _ in range(3):
            packer = Packer(kind="documents", seq_len=4096, pad_id=0, ignore_index=-100)
            t0 = time.process_time()
            examples = render({"messages": convs}, range(len(convs)))
            rows = packer(examples)
            best = min(best, time.process_time() - t0)
            tokens = sum(len(e.ids) for e in examples if e is not None)
        assert rows is not None
        print(f"{n:>9} {tokens / len(convs):>12,.0f} {tokens / best:>13,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
