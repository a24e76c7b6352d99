import pytest
import zmq

from remoting import tokens

SECRET = b"cluster-secret"
PUBLIC, _ = zmq.curve_keypair()


def test_a_minted_token_parses_and_verifies():
    tok = tokens.mint(SECRET, PUBLIC, "alice")
    parsed = tokens.parse(str(tok))
    assert parsed.user == "alice" and not parsed.admin
    assert tokens.verify(SECRET, parsed)
    assert parsed.server_public_z85 == PUBLIC


def test_admin_role_is_signed():
    tok = tokens.mint(SECRET, PUBLIC, "root", admin=True)
    assert tokens.parse(str(tok)).admin
    forged = str(tok).replace("bf1.a.", "bf1.u.", 1)
    assert not tokens.verify(SECRET, tokens.parse(forged))
    user_tok = str(tokens.mint(SECRET, PUBLIC, "mallory"))
    promoted = user_tok.replace("bf1.u.", "bf1.a.", 1)
    assert not tokens.verify(SECRET, tokens.parse(promoted))


def test_another_clusters_secret_does_not_verify():
    tok = tokens.mint(SECRET, PUBLIC, "alice")
    assert not tokens.verify(b"other", tok)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello",
        "bf1.u.alice",
        "bf2.u.a.b.c.d",
        "bf1.x.alice.n.m.k",
        "bf1.u.al ice.n.m.k",
        "bf1.u.alice.n.m.short",
    ],
)
def test_garbage_is_refused_with_a_sentence(text):
    with pytest.raises(tokens.TokenError) as info:
        tokens.parse(text)
    assert str(info.value).endswith(".")


def test_bad_user_names_are_refused():
    with pytest.raises(tokens.TokenError, match="not allowed"):
        tokens.mint(SECRET, PUBLIC, "a.b")
