"""``lipflow sample`` prints tokens as it draws them: the sampler keeps only the model's context (flat
memory), its tokens are nanoGPT's loop's, and the printed pieces join to the decoding of all tokens,
never splitting a UTF-8 character that a byte-level token holds only part of."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lipflow.api import load_run
from lipflow.cli import decoded_pieces
from lipflow.data.loader import load_tokenizer
from lipflow.model import build_model

from conftest import run_stage
from test_cli import results_tree  # noqa: F401  (a fixture)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: one token per byte, as a freshly trained ``bpe`` tokenizer has
    for any byte it rarely saw."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({ch: i for i, ch in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def test_pieces_never_split_a_character_and_join_to_the_whole_text():
    tokenizer = byte_tokenizer()
    text = "To bé, 日本 or not"
    ids = tokenizer.encode(text).ids
    assert len(ids) == len(text.encode())  # one token per byte: 日 is three tokens
    prompt, drawn = ids[:3], [[i] for i in ids[3:]]
    pieces = list(decoded_pieces(tokenizer, prompt, drawn))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[0] == "To b" and "日" in pieces and "本" in pieces  # a character comes whole, at once
    assert len(pieces) == len(text) - 3  # one piece per character after the prompt's


def test_a_text_ending_inside_a_character_is_still_printed_at_the_end():
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode("ab日").ids[:-1]  # the last character's final byte never comes
    pieces = list(decoded_pieces(tokenizer, ids[:1], [[i] for i in ids[1:]]))
    assert "".join(pieces) == tokenizer.decode(ids) and pieces[-1].endswith("\ufffd")


def test_a_drawn_end_of_text_is_printed_where_the_model_ends_a_document():
    """The document separator the shards put between documents shows in the sample (the tokenizers
    library's decode drops special tokens unless told not to, which joined two documents into one)."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens(["<|endoftext|>"])
    eot = tokenizer.token_to_id("<|endoftext|>")
    first, second = tokenizer.encode("end.").ids, tokenizer.encode("Act II").ids
    pieces = list(decoded_pieces(tokenizer, first[:1], [[i] for i in first[1:] + [eot] + second]))
    assert "".join(pieces) == "end.<|endoftext|>Act II" and "<|endoftext|>" in pieces


def nanogpt_generate(model, idx, new_tokens, temperature, generator):
    """nanoGPT's ``generate``, the reference: the whole sequence kept, the last ``context`` fed."""
    for _ in range(new_tokens):
        logits = model(idx[:, -model.context:])[:, -1, :] / max(temperature, 1e-6)
        nxt = torch.multinomial(torch.softmax(logits.float(), dim=-1), 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


@torch.no_grad()
def test_sampled_tokens_are_nanogpts_also_past_the_context(tiny_run_config):
    model = build_model(tiny_run_config, vocab_size=50).eval()
    prompt = torch.tensor([[3, 1, 4]])
    n = 3 * model.context  # well past the context: the window slides
    ours = model.generate(prompt, n, 0.8, torch.Generator().manual_seed(7))
    reference = nanogpt_generate(model, prompt, n, 0.8, torch.Generator().manual_seed(7))
    assert ours.shape == (1, 3 + n) and torch.equal(ours, reference)


def test_the_command_prints_what_the_run_generates(results_tree):  # noqa: F811
    results, run_id = results_tree
    done = run_stage("lipflow.cli", "sample", run_id, "--results", str(results), "--prompt", "The", "--tokens", "40",
                     "--seed", "3", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    run = load_run(run_id, results=results, device="cpu")
    tokenizer = load_tokenizer(run.data_dir)
    ids = tokenizer.encode("The").ids
    expected = run.model.generate(torch.tensor([ids]), 40, 0.8, torch.Generator().manual_seed(3))
    # special tokens drawn ([UNK] here, from a barely trained model) are printed as their text
    assert done.stdout == tokenizer.decode(expected[0].tolist(), skip_special_tokens=False) + "\n"


def test_pieces_keep_the_spaces_a_metaspace_decoder_puts_between_tokens():
    """A SentencePiece-style tokenizer file (Metaspace): decoded token by token, "Hello world" lost its
    space; decoded in a window one printed token back, the pieces join to the whole decoding."""
    tokenizer = Tokenizer(models.WordLevel({"▁Hello": 0, "▁world": 1, "▁to": 2, "!": 3, "[UNK]": 4}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    ids = tokenizer.encode("Hello world to!").ids
    assert "".join(decoded_pieces(tokenizer, ids[:1], [[i] for i in ids[1:]])) == tokenizer.decode(ids)


def test_pieces_of_a_long_wordpiece_text_join_to_its_decoding_in_linear_work():
    """A WordPiece decoder joins ``##`` pieces to the word before and puts spaces between words: the
    pieces of 2,000 drawn tokens join to the whole decoding, and the tokens decoded along the way are
    a few per drawn token (a window one printed token back), not all tokens so far at every step."""
    vocab = {"[UNK]": 0, "the": 1, "king": 2, "##dom": 3, "##s": 4, "rule": 5, ",": 6}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, len(vocab), (2002,), generator=generator).tolist()

    class Counting:
        decoded = 0

        def decode(self, tokens, skip_special_tokens=True):
            self.decoded += len(tokens)
            return tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    counting = Counting()
    pieces = list(decoded_pieces(counting, ids[:2], [[i] for i in ids[2:]]))
    assert "".join(pieces) == tokenizer.decode(ids) and len(pieces) == 2000
    assert counting.decoded <= 4 * len(ids) + len(ids), counting.decoded  # the last term: the final check
