"""Which chat template a model chats with (unigemma/templates): the checkpoint's, a file the user
gives (--chat-template, chat_template=), the family's published default, or none — and what a
user sees in each case: the start-up line, the errors naming the flag, the server's 400.

The oracles for Gemma 3's default: transformers' own template renderer writes the text and
the sentencepiece library (over the 270M's vocabulary) tokenizes it; our Processor must give the
same text and token ids."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from server_helpers import Running, tiny_checkpoint, tiny_gemma

import unigemma
from unigemma.cli import main
from unigemma.config import ModelConfig
from unigemma.errors import InputError, NoChatTemplate, UnigemmaError
from unigemma.models import family_of
from unigemma.processing.chat import Processor
from unigemma.server import ServerConfig, create_app
from unigemma.templates import PUBLISHED, ChatTemplate, choose, from_file, published

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "chat-templates"
GEMMA3_TURNS = ("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!"
                "<end_of_turn>\n<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}]


def tiny_gemma3() -> unigemma.Gemma:
    """A random Gemma 3 text model (Gemma 3's vocabulary size) with no tokenizer, so no template of its own."""
    family = family_of("gemma3_text")
    config = dict(family.tiny_config("gemma3_text"), vocab_size=262144)
    return unigemma.Gemma(family.model(ModelConfig.from_dict(config)))


# --- the choice ---------------------------------------------------------------------------
def test_choice_order_given_then_checkpoint_then_family_then_none():
    given = ChatTemplate("{{ 'mine' }}", "mine.jinja (--chat-template)")
    assert choose(given, "{{ 'ckpt' }}", "gemma3") is given
    assert choose(None, "{{ 'ckpt' }}", "gemma3") == ChatTemplate("{{ 'ckpt' }}", "the checkpoint's")
    default = choose(None, None, "gemma3")
    assert default.source == published("gemma3")
    assert default.origin == "Gemma 3's published default (the checkpoint has none)"
    assert choose(None, "", "gemma4").origin == "Gemma 4's published default (the checkpoint has none)"
    none = choose(None, None, None)
    assert none.source is None and "--chat-template FILE" in none.origin


def test_every_family_names_a_shipped_template():
    from unigemma.models import FAMILIES

    for family in FAMILIES:
        assert family.chat_template in PUBLISHED, family.name
        assert "{%" in published(family.chat_template)


def test_gemma4_default_is_the_published_31b_it_template():
    fixture = FIXTURES / "google-gemma-4-31B-it.jinja"
    if not fixture.exists():
        pytest.skip("the shared chat-template fixtures are not here (../shared/fixtures/chat-templates)")
    assert published("gemma4") == fixture.read_text(encoding="utf-8")


def test_a_checkpoint_without_a_template_chats_with_its_familys():
    gemma = tiny_gemma3()
    assert gemma.template.origin == "Gemma 3's published default (the checkpoint has none)"
    assert gemma.template.source == published("gemma3")
    # given to Gemma as text, it wins
    assert unigemma.Gemma(gemma.model, chat_template="{{ 'x' }}").template.source == "{{ 'x' }}"


# --- files the user names -----------------------------------------------------------------
def test_template_file_errors_name_the_flag(tmp_path):
    with pytest.raises(UnigemmaError, match=r"^--chat-template: cannot read .*nope\.jinja"):
        from_file(tmp_path / "nope.jinja", "--chat-template")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m }")
    with pytest.raises(UnigemmaError, match=r"^--chat-template: .*bad\.jinja is not a valid Jinja template"):
        from_file(bad, "--chat-template")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(UnigemmaError, match="is empty"):
        from_file(tmp_path / "empty.jinja", "--chat-template")
    (tmp_path / "latin1.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(UnigemmaError, match="cannot read"):
        from_file(tmp_path / "latin1.jinja", "--chat-template")
    good = tmp_path / "good.jinja"
    good.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert from_file(good, "--chat-template") == ChatTemplate(good.read_text(), f"{good} (--chat-template)")


def test_load_checks_its_chat_template_argument_before_the_weights(tmp_path):
    # the checkpoint path does not exist either: the template is checked first
    with pytest.raises(UnigemmaError, match=r"^chat_template=: cannot read"):
        unigemma.load(tmp_path / "no-checkpoint", chat_template=tmp_path / "missing.jinja")


@pytest.mark.parametrize("cmd", ["run", "chat", "serve"])
def test_cli_refuses_a_bad_template_file_before_loading(tmp_path, capsys, cmd):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if %}")
    argv = [cmd, "--model", str(tmp_path / "no-checkpoint"), "--chat-template", str(bad)]
    argv += ["hi"] if cmd == "run" else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --chat-template:" in err and "not a valid Jinja template" in err


# --- what the user sees -------------------------------------------------------------------
def test_startup_line_says_which_template(tmp_path, capsys):
    from unigemma.vocab import gemma4_vocab_gguf

    ckpt, vocab = str(tiny_checkpoint(tmp_path)), str(gemma4_vocab_gguf())
    run = ["run", "--model", ckpt, "--tokenizer", vocab, "--dtype", "float32", "--max-tokens", "2",
           "--temperature", "0", "hi"]
    assert main(run) == 0
    assert "chat template: the checkpoint's\n" in capsys.readouterr().err
    mine = tmp_path / "mine.jinja"
    mine.write_text("{{ bos_token }}<|turn>user\n{{ messages[-1]['content'] }}<turn|>\n<|turn>model\n")
    assert main(run[:-1] + ["--chat-template", str(mine), "hi"]) == 0
    assert f"chat template: {mine} (--chat-template)\n" in capsys.readouterr().err


def test_no_template_python_users_get_the_argument_hint():
    tokenizer = SimpleNamespace(name="tok", chat_template=None, special_tokens_map={}, token_to_id=lambda t: None)
    with pytest.raises(NoChatTemplate, match=r"pass chat_template='path/to/template\.jinja' to unigemma\.load"):
        Processor(tokenizer, choose(None, None, None).source).render([{"role": "user", "content": "hi"}])


def test_no_template_server_error_names_the_server_flag(tmp_path):
    gemma = tiny_gemma(tmp_path)
    # as a checkpoint of a family without a published template would be
    gemma.tokenizer.chat_template, gemma.template = None, choose(None, None, None)
    with Running(create_app(gemma, ServerConfig(model_name="tiny", max_seqs=1, max_len=256))) as server:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "server_configuration_error" and error["code"] == "chat_template_missing"
        assert "start the server with --chat-template FILE" in error["message"]
        assert "Processor" not in error["message"] and "chat_template=" not in error["message"]
        # plain continuation needs no template
        r = httpx.post(server.url + "/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


# --- Gemma 3's default against transformers and SentencePiece --------------------------
def test_gemma3_default_renders_and_tokenizes_as_the_references():
    """transformers' own renderer writes the text; the sentencepiece library (test_tokenizer's
    Gemma 3 oracle) tokenizes it between the control tokens, which it never reads from text."""
    oracle = pytest.importorskip("transformers.utils.chat_template_utils", reason="the test oracle")
    render = oracle.render_jinja_template
    from test_tokenizer import gemma3_gguf, gemma3_sentencepiece

    sp, meta = gemma3_sentencepiece()
    ids = {t: meta["tokenizer.ggml.tokens"].index(t) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>")}
    gemma = unigemma.Gemma(tiny_gemma3().model, unigemma.Tokenizer.from_gguf(gemma3_gguf()))
    processor, template = gemma.processor(), published("gemma3")
    assert processor.render(CONVERSATION) == GEMMA3_TURNS
    for conversation in (CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:3] + [
            {"role": "user", "content": "  tabs\tand\nnew lines, é, 日本語  "}]):
        text = render([conversation], chat_template=template, add_generation_prompt=True, bos_token="<bos>")[0][0]
        assert processor.render(conversation) == text
        want = [i for part in re.split("(<bos>|<start_of_turn>|<end_of_turn>)", text) if part
                for i in ([ids[part]] if part in ids else sp.encode(part))]
        assert processor(conversation).input_ids[0].tolist() == want  # <bos> once: the template writes it
    with pytest.raises(InputError, match="must alternate"):  # the published template's own check
        processor([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # the reply's end of turn ends generation
    assert ids["<end_of_turn>"] in gemma.engine.base_stop_ids
