"""Unit tests of the bearer-token file format and of caller identification (cloud_server.auth)."""

from __future__ import annotations

import pytest

from cloud_server.auth import Authenticator, load_tokens
from splitinfer.errors import ConfigError, Unauthenticated

TOKEN = "s3cret-token-0123456789"


def write(tmp_path, text: str):
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_names_bare_tokens_and_comments(tmp_path):
    tokens = load_tokens(write(tmp_path, f"# comment\n\nedge-1:{TOKEN}\n  other-token-abcdefgh  \n"))
    assert tokens[TOKEN] == "edge-1"
    assert tokens["other-token-abcdefgh"].startswith("token-")  # a digest, never the token itself
    assert "abcdefgh" not in tokens["other-token-abcdefgh"]


def test_a_token_containing_a_colon_is_written_with_an_empty_name(tmp_path):
    tokens = load_tokens(write(tmp_path, ":abc:def-0123456789xyz\n"))
    assert list(tokens) == ["abc:def-0123456789xyz"]
    auth = Authenticator(tokens)
    assert auth.identify([("authorization", "Bearer abc:def-0123456789xyz")], "ipv4:127.0.0.1:1") == \
        tokens["abc:def-0123456789xyz"]


@pytest.mark.parametrize(("text", "message"), [
    ("abc def:0123456789abcdefgh\n", "client name"),          # not a name: the ':' was meant inside a token
    ("edge:short\n", "shorter than 16"),
    ("edge:0123456789 abcdefgh\n", "whitespace"),
    (f"a:{TOKEN}\nb:{TOKEN}\n", "listed twice"),
    ("# nothing\n\n", "holds no token"),
])
def test_bad_files_are_refused_with_the_line(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_tokens(write(tmp_path, text))


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_tokens(tmp_path / "missing")


def test_identify_needs_a_known_bearer_token():
    auth = Authenticator({TOKEN: "edge-1"})
    assert auth.identify([("authorization", f"Bearer {TOKEN}")], "ipv4:10.0.0.1:5") == "edge-1"
    assert auth.identify([("Authorization", f"bearer  {TOKEN} ".encode())], "ipv4:10.0.0.1:5") == "edge-1"
    for metadata in ([], [("authorization", "Basic abc")], [("authorization", "Bearer ")],
                     [("authorization", "Bearer wrong-token-0123456789")]):
        with pytest.raises(Unauthenticated):
            auth.identify(metadata, "ipv4:10.0.0.1:5")


def test_without_tokens_the_peer_host_identifies_the_caller():
    auth = Authenticator()
    assert auth.identify(None, "ipv4:10.0.0.1:5555") == "ipv4:10.0.0.1"
    assert auth.identify(None, "ipv6:[::1]:5555") == "ipv6:[::1]"
