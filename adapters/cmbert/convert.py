"""Build CM-BERT's ``pre-trained BERT`` folder from a ``transformers`` BERT.

CM-BERT loads BERT with its own copy of pytorch-pretrained-bert's classes, from a *directory*
holding ``bert_config.json``, ``pytorch_model.bin`` (a state dict with pytorch-pretrained-bert's
parameter names) and ``vocab.txt``; its README says to assemble that by hand from a Google
download.  This command writes the folder from a ``transformers`` checkpoint instead::

    python -m deqfusion.adapters.cmbert.convert --out "third_party/cmbert/pre-trained BERT"
    python -m deqfusion.adapters.cmbert.convert --model /path/to/bert-base-uncased --out DIR --offline

``--model`` is a hub name (``bert-base-uncased``, the paper's, by default; taken from the user's
hub cache, downloaded there if missing and allowed) or a local folder in ``save_pretrained`` form.

The name mapping (``transformers.BertModel`` -> pytorch-pretrained-bert 0.6.1 ``BertForPreTraining``):

    embeddings.* / encoder.layer.N.* / pooler.*   ->  bert.embeddings.* / bert.encoder.layer.N.* / bert.pooler.*

Both libraries name the sub-modules alike (``attention.self.query``, ``attention.output.LayerNorm``,
``intermediate.dense``, ``output.dense``, ...), so the map is the ``bert.`` prefix; old TF-style
``LayerNorm.gamma`` / ``.beta`` names become ``.weight`` / ``.bias``; buffers (``position_ids``)
and pre-training heads (``cls.*``) are not written (CM-BERT does not use them).  The mapping is
checked, not assumed: every name must match the expected pattern, and the folder is refused
for a model CM-BERT would build differently:

* CM-BERT's ``BertEncoder`` builds ``num_attention_heads`` layers (``range(config.num_attention_heads)``,
  model.py at the pin), not ``num_hidden_layers``: both must be equal (12 and 12 for BERT-base);
* its ``BertFinetun`` hard-codes a hidden size of 768 (``Conv1d(768, 30)``, ``Linear(768, 768)``);
* its ``BertLayerNorm`` uses eps 1e-12 and its ``gelu`` is the erf form (``hidden_act="gelu"``).

``--random`` writes a small randomly initialised BERT in the same format (hidden 768 as CM-BERT
needs, few layers, a word-level vocabulary from CMU-MOSI's training text), so that the upstream
loop runs end to end without a download; every number from it is "random BERT, not a result".
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

DEFAULT_MODEL = "bert-base-uncased"
CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME = "bert_config.json", "pytorch_model.bin", "vocab.txt"
SOURCE_NAME = "deqfusion_source.json"  # what this folder was made from (read by the reproduce report)
CMBERT_HIDDEN = 768
CMBERT_LN_EPS = 1e-12
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
RANDOM_BERT = "random BERT, not a result"
# pytorch-pretrained-bert 0.6.1 BertConfig fields, in its to_json_string order (sorted)
CONFIG_KEYS = ("attention_probs_dropout_prob", "hidden_act", "hidden_dropout_prob", "hidden_size",
               "initializer_range", "intermediate_size", "max_position_embeddings", "num_attention_heads",
               "num_hidden_layers", "type_vocab_size", "vocab_size")
_LAYER = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
          r"attention\.output\.LayerNorm|intermediate\.dense|output\.dense|output\.LayerNorm)\.(weight|bias)")
_NAME = re.compile(r"^(embeddings\.(word_embeddings|position_embeddings|token_type_embeddings)\.weight|"
                   r"embeddings\.LayerNorm\.(weight|bias)|" + _LAYER + r"|pooler\.dense\.(weight|bias))$")
_SKIP = re.compile(r"(^|\.)position_ids$|^cls\.|(^|\.)token_type_ids$")


class ConvertError(ValueError):
    """The source BERT cannot become a CM-BERT folder; the message says why and what to do."""


def cmbert_name(name: str) -> Optional[str]:
    """pytorch-pretrained-bert's name for a transformers BertModel (or BertFor*) parameter; None = not written."""
    if name.startswith("bert."):
        name = name[len("bert."):]
    if _SKIP.search(name):
        return None
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    if not _NAME.match(name):
        raise ConvertError(f"unexpected BERT parameter {name!r}: not a BertModel weight this converter knows "
                           f"(is the source a BERT, with absolute position embeddings?)")
    return "bert." + name


def cmbert_state_dict(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """The state dict CM-BERT's ``from_pretrained`` loads: float32 CPU tensors under pytorch-pretrained-bert names."""
    import torch

    out: OrderedDict[str, Any] = OrderedDict()
    for name, tensor in state.items():
        new = cmbert_name(name)
        if new is None:
            continue
        if new in out:
            raise ConvertError(f"two source parameters map to {new!r}")
        out[new] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def cmbert_config(hf_config: Any) -> Dict[str, Any]:
    """pytorch-pretrained-bert's ``bert_config.json`` fields from a transformers BertConfig."""
    return {key: getattr(hf_config, key) for key in CONFIG_KEYS}


def check_for_cmbert(cfg: Mapping[str, Any], hf_config: Any = None, *, any_size: bool = False) -> None:
    """Refuse what CM-BERT's own classes would build differently from the source model."""
    if cfg["num_hidden_layers"] != cfg["num_attention_heads"]:
        raise ConvertError(
            f"CM-BERT's BertEncoder builds num_attention_heads={cfg['num_attention_heads']} layers, but this BERT has "
            f"num_hidden_layers={cfg['num_hidden_layers']}: CM-BERT would load it wrongly. Use a BERT whose layer and "
            f"head counts are equal (bert-base-uncased: 12 and 12)")
    if cfg["hidden_act"] != "gelu":
        raise ConvertError(f"hidden_act={cfg['hidden_act']!r}: CM-BERT's BERT supports the erf 'gelu' of BERT checkpoints")
    if hf_config is not None:
        eps = getattr(hf_config, "layer_norm_eps", CMBERT_LN_EPS)
        if abs(float(eps) - CMBERT_LN_EPS) > 1e-15:
            raise ConvertError(f"layer_norm_eps={eps}: CM-BERT's BertLayerNorm uses {CMBERT_LN_EPS}")
        kind = getattr(hf_config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ConvertError(f"position_embedding_type={kind!r}: CM-BERT's BERT has absolute position embeddings")
    if not any_size and cfg["hidden_size"] != CMBERT_HIDDEN:
        raise ConvertError(f"hidden_size={cfg['hidden_size']}: CM-BERT's BertFinetun hard-codes {CMBERT_HIDDEN} "
                           f"(Conv1d(768, 30), Linear(768, 768)); use a BERT-base-sized model")


def vocab_lines(vocab: Mapping[str, int]) -> List[str]:
    """vocab.txt lines (one token per line, line number = id) from a token -> id mapping."""
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    ids = [i for _, i in by_id]
    if ids != list(range(len(ids))):
        raise ConvertError("the tokenizer's vocabulary ids are not 0..V-1 without gaps; cannot write vocab.txt")
    return [tok for tok, _ in by_id]


def write_folder(out: Path, state: Mapping[str, Any], cfg: Mapping[str, Any], vocab: Sequence[str],
                 source: Mapping[str, Any], *, force: bool = False) -> Path:
    """Write bert_config.json, pytorch_model.bin, vocab.txt (and deqfusion_source.json) into ``out``."""
    import torch

    out = Path(out)
    existing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME) if (out / n).exists()]
    if existing and not force:
        raise ConvertError(f"{out} already holds {', '.join(existing)}; pass --force to overwrite")
    if len(vocab) != cfg["vocab_size"]:
        raise ConvertError(f"the vocabulary has {len(vocab)} tokens but the model's vocab_size is {cfg['vocab_size']}")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(OrderedDict(state), out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(dict(cfg), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / VOCAB_NAME).write_text("".join(tok + "\n" for tok in vocab), encoding="utf-8")
    (out / SOURCE_NAME).write_text(json.dumps(dict(source), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def convert(model: str = DEFAULT_MODEL, out: Path = Path("pre-trained BERT"), *, offline: bool = False,
            cache_dir: Optional[str] = None, force: bool = False, any_size: bool = False) -> Path:
    """Load ``model`` with transformers (hub cache or local folder) and write CM-BERT's folder."""
    try:
        import transformers
        from transformers import AutoTokenizer, BertModel
    except ImportError as err:  # pragma: no cover - the [cmbert] extra brings it
        raise ConvertError("transformers is not installed: pip install 'deqfusion[cmbert]' (after torch)") from err
    try:
        bert = BertModel.from_pretrained(model, local_files_only=offline, cache_dir=cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=offline, cache_dir=cache_dir)
    except OSError as err:
        where = "a local folder in save_pretrained form, or a hub name in your cache"
        raise ConvertError(f"cannot load {model!r} with transformers ({err}); pass --model {where}"
                           + ("" if offline else ", or check the network") ) from err
    cfg = cmbert_config(bert.config)
    check_for_cmbert(cfg, bert.config, any_size=any_size)
    state = cmbert_state_dict(bert.state_dict())
    vocab = vocab_lines(tokenizer.get_vocab())
    source = {"kind": "transformers", "model": model, "transformers": transformers.__version__,
              "do_lower_case": bool(getattr(tokenizer, "do_lower_case", True))}
    return write_folder(Path(out), state, cfg, vocab, source, force=force)


# ----------------------------------------------------------------------------------------------
# a small random BERT in CM-BERT's format (runs the upstream loop without a download)


def words_vocab(texts: Iterable[str], limit: Optional[int] = None) -> List[str]:
    """Special tokens, then lower-cased words and punctuation by frequency (BERT's basic tokenisation:
    whitespace, punctuation split off), so CM-BERT's WordPiece tokenizer maps known words to themselves."""
    from collections import Counter

    counts: Counter = Counter()
    for text in texts:
        counts.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in SPECIAL_TOKENS]
    if limit is not None:
        words = words[: max(0, limit - len(SPECIAL_TOKENS))]
    return list(SPECIAL_TOKENS) + words


def random_bert(out: Path, texts: Iterable[str], *, layers: int = 2, intermediate: int = 128, seed: int = 0,
                force: bool = False) -> Path:
    """A randomly initialised ``transformers`` BERT (hidden 768, ``layers`` layers = heads) written as
    CM-BERT's folder through the same mapping as :func:`convert`; marked "random BERT, not a result"."""
    import torch
    from transformers import BertConfig, BertModel

    vocab = words_vocab(texts)
    config = BertConfig(vocab_size=len(vocab), hidden_size=CMBERT_HIDDEN, num_hidden_layers=layers,
                        num_attention_heads=layers, intermediate_size=intermediate, max_position_embeddings=512)
    torch.manual_seed(seed)
    bert = BertModel(config)
    cfg = cmbert_config(config)
    check_for_cmbert(cfg, config)
    source = {"kind": "random", "label": RANDOM_BERT, "seed": seed, "layers": layers, "intermediate": intermediate,
              "vocab": "CMU-MOSI training text, word level"}
    return write_folder(Path(out), cmbert_state_dict(bert.state_dict()), cfg, vocab, source, force=force)


def folder_source(folder: Path) -> Dict[str, Any]:
    """What a CM-BERT BERT folder was made from (``{"kind": "unknown"}`` for one made elsewhere)."""
    path = Path(folder) / SOURCE_NAME
    if not path.is_file():
        return {"kind": "unknown"}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {"kind": "unknown"}


def check_folder(folder: Path) -> Path:
    """A CM-BERT BERT folder must hold the three files; the error names the command that makes them."""
    folder = Path(folder)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME) if not (folder / n).is_file()]
    if missing:
        raise ConvertError(f"{folder} lacks {', '.join(missing)}: make it with "
                           f"`python -m deqfusion.adapters.cmbert.convert --out \"{folder}\"` "
                           f"(bert-base-uncased through transformers), or use --random-bert")
    return folder


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="transformers BERT: a hub name (from your hub cache, downloaded if missing unless --offline) "
                        "or a local save_pretrained folder")
    p.add_argument("--out", type=Path, required=True, help="the folder to write (CM-BERT's 'pre-trained BERT')")
    p.add_argument("--offline", action="store_true", help="never download: use the hub cache or a local folder only")
    p.add_argument("--cache-dir", default=None, help="transformers cache folder (default: the hub's)")
    p.add_argument("--force", action="store_true", help="overwrite an existing folder's files")
    p.add_argument("--any-size", action="store_true",
                   help="allow a hidden size other than 768 (CM-BERT's BertFinetun will not run with it)")
    p.add_argument("--random", action="store_true",
                   help="write a small random BERT (hidden 768, 2 layers, vocabulary from --text) instead")
    p.add_argument("--text", type=Path, default=None, help="with --random: CMU-MOSI's train.tsv (vocabulary source)")


def run_command(args: argparse.Namespace) -> int:
    try:
        if args.random:
            if args.text is None:
                raise ConvertError("--random needs --text PATH/train.tsv (the vocabulary's source)")
            from .data import read_tsv_lines

            texts = [line.decode("utf-8").split("\t")[0] for line in read_tsv_lines(args.text)[1:]]
            out = random_bert(args.out, texts, force=args.force)
        else:
            out = convert(args.model, args.out, offline=args.offline, cache_dir=args.cache_dir, force=args.force,
                          any_size=args.any_size)
    except ConvertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}/{CONFIG_NAME}, {WEIGHTS_NAME}, {VOCAB_NAME}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """``deqfusion cmbert-bert``: for core/cli.py's COMMANDS (the lead's list)."""
    p = subparsers.add_parser("cmbert-bert", help="build CM-BERT's 'pre-trained BERT' folder from a transformers BERT",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run_command)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deqfusion.adapters.cmbert.convert",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
