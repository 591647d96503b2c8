"""The demo model reads prompts as people write them, without retraining: its tokenizers rewrite them.

The demo model (engine/models/demo) was trained on one form of prompt, "a red circle on a blue background"
(or either half), one token per word. People write "An orange triangle on the blue background.", "Red
circle, blue background" or "a red square with a green background": before this, an article other than
"a", a capital's neighbours, a comma or a missing "on" shifted or added tokens the model never saw, and it
drew the wrong colours. Each tokenizer's `tokenizer.json` (the fast CLIP tokenizer) carries a normalizer
that rewrites such prompts into the trained form before tokenizing: lower case, punctuation to spaces,
"an"/"the" to "a", a missing or other preposition between the shape and "... background" to "on a", and a
leading "a" before a colour. Every rewritten prompt gives exactly the token ids of the trained form, so the
model draws it exactly as it draws that form; the weights, vocabulary and merges are unchanged. Any loader
of the folder (diffusers' `from_pretrained` included) reads prompts the same way.

`world.json` lists the words the model knows (`words`): the server reports the other words of a prompt
(after this rewriting) as unknown, and still draws it.

One command applies it to a model folder (tools/train_demo_model.py runs it on every model it writes):
    python -m sdxl_server.engine.models.demo_vocabulary server/sdxl_server/engine/models/demo
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from sdxl_server.engine.models import shapes

TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
FAST_TOKENIZER_CLASS = "CLIPTokenizerFast"  # the class that reads tokenizer.json, and so the normalizer
# Words people put between a shape and its background instead of "on".
PREPOSITIONS = ("on", "with", "against", "over")


def prompt_normalizer() -> Any:
    """The `tokenizers` normalizer that rewrites prompts into the trained form (module docstring)."""
    from tokenizers import Regex, normalizers

    colours = "|".join(shapes.COLOURS)
    shape_names = "|".join(shapes.SHAPES)
    prepositions = "|".join(PREPOSITIONS)
    return normalizers.Sequence(
        [
            # CLIP's own cleaning (as the converted fast CLIP tokenizer does it), then ours.
            normalizers.NFC(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[^\p{L}\p{N}\s]+"), " "),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
            normalizers.Replace(Regex(r"\b(?:an|the)\b"), "a"),
            # "circle blue background", "circle, a blue background", "circle with a blue background".
            normalizers.Replace(
                Regex(rf"(?<={shape_names})(?: (?:{prepositions}))?(?: a)? (?=(?:{colours}) background\b)"),
                " on a ",
            ),
            # A prompt that starts with a colour ("Red circle ...") gets its article. One rule per colour:
            # a zero-width insertion would confuse the tokenizer's offsets and add a stray token.
            *(normalizers.Replace(Regex(rf"^{colour}\b"), f"a {colour}") for colour in shapes.COLOURS),
        ]
    )


def widen(directory: Path) -> None:
    """Give the model folder's tokenizers the normalizer, and world.json the words the model knows."""
    from transformers import CLIPTokenizerFast

    for name in TOKENIZER_DIRS:
        folder = directory / name
        fast = CLIPTokenizerFast.from_pretrained(str(folder), from_slow=True)
        fast.backend_tokenizer.normalizer = prompt_normalizer()
        fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
        _update_json(folder / "tokenizer_config.json", tokenizer_class=FAST_TOKENIZER_CLASS)
    index = json.loads((directory / "model_index.json").read_text())
    for name in TOKENIZER_DIRS:
        index[name] = ["transformers", FAST_TOKENIZER_CLASS]
    _write_json(directory / "model_index.json", index)
    _update_json(directory / "world.json", words=list(shapes.WORDS))


def write_sha256sums(directory: Path) -> None:
    """SHA256SUMS over every file of the folder but itself and the notes (TRAINING.md)."""
    skipped = {"SHA256SUMS", "TRAINING.md"}
    lines = [
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(directory)}\n"
        for path in sorted(p for p in directory.rglob("*") if p.is_file())
        if str(path.relative_to(directory)) not in skipped
    ]
    (directory / "SHA256SUMS").write_text("".join(lines))


def _update_json(path: Path, **values: Any) -> None:
    _write_json(path, {**json.loads(path.read_text()), **values})


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m sdxl_server.engine.models.demo_vocabulary MODEL_DIR", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    widen(directory)
    write_sha256sums(directory)
    print(f"{directory}: tokenizers rewrite prompts into the trained form; SHA256SUMS rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
