"""End to end: ``pop3d serve`` with TLS, and real clients at their default TLS settings.

The server listens for POP3 (STLS) and POP3S on ``127.0.0.1:0`` with a
``trustme`` certificate, and with ``--cleartext-auth-from none``: the only
way to log in is over TLS, so a client that fetches mail did it encrypted.
The clients trust the test CA and check the server's name, as by default.
"""

from __future__ import annotations

import poplib
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from .certs import Certs, issue
from .serve_process import SECOND, WELCOME, ServeProcess, mail_files, pop3d_cli, serve_args
from .test_clients import assert_fetched, delivered, fetch_with_mpop, run

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")


def tls_args(certs: Certs) -> list[str]:
    return ["--listen-tls", "127.0.0.1:0", "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)]


@pytest.fixture
def proc(site: Path, certs: Certs) -> Iterator[ServeProcess]:
    args = serve_args(site, "--no-admin", "--cleartext-auth-from", "none", *tls_args(certs))
    with ServeProcess(*args) as process:
        yield process.wait_ready()


def pop3s_port(proc: ServeProcess) -> int:
    return proc.pop3["pop3s"][1]


def peer_certificate(port: int, certs: Certs) -> bytes:
    """The certificate a new POP3S connection is shown."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        certs.client_context().wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_no_login_before_stls(proc: ServeProcess, certs: Certs) -> None:
    pop = poplib.POP3("localhost", proc.port, timeout=10)
    capabilities = pop.capa()
    assert "STLS" in capabilities and "USER" not in capabilities and "SASL" not in capabilities
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\].*use STLS first"):
        pop.user("alice")
    pop.stls(certs.client_context())
    assert {"USER", "SASL"} <= set(pop.capa())
    pop.user("alice")
    pop.pass_("wonderland")
    assert pop.retr(1)[1] == WELCOME.split(b"\n")[:-1]
    pop.quit()


@needs_curl
@pytest.mark.parametrize("scheme", ["pop3", "pop3s"])
def test_curl(proc: ServeProcess, certs: Certs, site: Path, scheme: str) -> None:
    assert CURL is not None
    port = proc.port if scheme == "pop3" else pop3s_port(proc)
    url = f"{scheme}://alice:wonderland@localhost:{port}"
    common = [CURL, "-sS", "--max-time", "10", "--cacert", str(certs.ca_file)]
    fetched = subprocess.run([*common, "--ssl-reqd", url + "/1"], capture_output=True, timeout=30)
    assert fetched.returncode == 0, fetched.stderr
    assert fetched.stdout == WELCOME.replace(b"\n", b"\r\n")
    deleted = subprocess.run([*common, "--ssl-reqd", "-X", "DELE", url + "/2", "-I"], capture_output=True, timeout=30)
    assert deleted.returncode == 0, deleted.stderr
    assert len(mail_files(site)) == 1
    # Without TLS, curl cannot log in: it is never offered a way to send the password.
    refused = subprocess.run([*common, f"pop3://alice:wonderland@localhost:{proc.port}/1"], capture_output=True)
    assert refused.returncode != 0 and len(mail_files(site)) == 1


@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
def test_fetchmail_upgrades_with_stls(proc: ServeProcess, certs: Certs, site: Path, tmp_path: Path) -> None:
    out = tmp_path / "fetchmail-out"
    out.mkdir()
    rc = tmp_path / "fetchmailrc"
    # No ssl options but the CA to trust: fetchmail's default is to require STLS and check the certificate.
    rc.write_text(
        "set no syslog\n"
        f"poll localhost service {proc.port} protocol pop3:\n"
        "  user 'alice' there with password 'wonderland' is 'root' here\n"
        "  no keep\n"
        f"  sslcertfile {certs.ca_file}\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg-$$'\"\n"
    )
    rc.chmod(0o600)
    result = run(
        ["fetchmail", "-f", str(rc), "-N", "--nosyslog", "-v"], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    )
    assert "STLS" in result.stdout + result.stderr
    assert_fetched(delivered(out))
    assert mail_files(site) == []


@pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed")
@pytest.mark.parametrize("mode", ["stls", "pop3s"])
def test_mpop(proc: ServeProcess, certs: Certs, site: Path, tmp_path: Path, mode: str) -> None:
    # TLS on, everything else as mpop has it: STARTTLS, certificate check, --auth=auto.
    options = ["--tls=on", f"--tls-trust-file={certs.ca_file}"]
    port = proc.port
    if mode == "pop3s":
        options.append("--tls-starttls=off")
        port = pop3s_port(proc)
    assert_fetched(fetch_with_mpop(tmp_path, "localhost", port, *options))
    assert mail_files(site) == []


def test_sighup_swaps_the_certificate(site: Path, certs: Certs, tls_ca: trustme.CA, tmp_path: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin", *tls_args(certs))) as proc:
        proc.wait_ready()
        port = pop3s_port(proc)
        assert peer_certificate(port, certs) == certs.der
        # An open session goes on across the reload.
        pop = poplib.POP3_SSL("localhost", port, timeout=10, context=certs.client_context())
        pop.user("alice")
        pop.pass_("wonderland")

        (tmp_path / "renewed").mkdir()
        renewed = issue(tls_ca, tmp_path / "renewed")
        # As a renewal tool does: new files put in place, then SIGHUP.
        shutil.copy(renewed.cert, certs.cert)
        shutil.copy(renewed.key, certs.key)
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"server pop3s loaded the certificate")
        assert peer_certificate(port, certs) == renewed.der
        assert pop.stat()[0] == 2

        # A broken file on the next reload: a log line, and the last good certificate stays.
        certs.cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"keeping the old certificate: cannot load")
        assert peer_certificate(port, certs) == renewed.der
        assert proc.proc.poll() is None
        pop.quit()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


def test_sighup_without_tls_is_harmless(site: Path) -> None:
    with ServeProcess(*serve_args(site, "--no-admin")) as proc:
        proc.wait_ready()
        proc.signal(signal.SIGHUP)
        proc.wait_for("no TLS certificate to reload")
        pop = poplib.POP3("127.0.0.1", proc.port, timeout=10)
        assert pop.getwelcome().startswith(b"+OK")
        pop.quit()
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (lambda c: ["--listen-tls", "127.0.0.1:0"], "listen-tls: needs tls-cert and tls-key"),
        (lambda c: ["--tls-cert", str(c.cert)], "tls-cert and tls-key go together"),
        (
            lambda c: ["--tls-cert", str(c.key), "--tls-key", str(c.key)],
            "tls-cert: " + "{key} holds no PEM certificate",
        ),
        (lambda c: ["--tls-cert", str(c.cert), "--tls-key", str(c.ca_file)], "holds no PEM private key"),
        (lambda c: ["--tls-cert", "/nonexistent.pem", "--tls-key", str(c.key)], "tls-cert: no such file"),
        (lambda c: ["--cleartext-auth-from", "10.0.0.1/8"], "cleartext-auth-from: 10.0.0.1/8 has host bits set"),
    ],
)
def test_bad_tls_settings_are_one_line_errors(site: Path, certs: Certs, extra: object, message: str) -> None:
    result = pop3d_cli("serve", *serve_args(site, "--no-admin"), *extra(certs))  # type: ignore[operator]
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("pop3d: error: ") and message.format(key=certs.key) in last, result.stderr
    assert "Traceback" not in result.stderr


def test_no_listener_at_all_is_a_one_line_error(site: Path) -> None:
    result = pop3d_cli("serve", *serve_args(site, "--no-admin")[2:], "--listen", "none")
    assert result.returncode == 2
    assert result.stderr.strip() == "pop3d: error: listen: give at least one HOST:PORT in listen or listen-tls"


def test_mismatched_key_is_a_one_line_error(site: Path, certs: Certs, tls_ca: trustme.CA, tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    other = issue(tls_ca, tmp_path / "other")
    result = pop3d_cli(
        "serve", *serve_args(site, "--no-admin", "--tls-cert", str(certs.cert), "--tls-key", str(other.key))
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"pop3d: error: tls-cert: the key in {other.key} does not match the certificate in {certs.cert}"
    )


def test_pop3s_only_from_the_environment(site: Path, certs: Certs) -> None:
    env = {
        "POP3D_LISTEN": "none",
        "POP3D_LISTEN_TLS": "127.0.0.1:0",
        "POP3D_TLS_CERT": str(certs.cert),
        "POP3D_TLS_KEY": str(certs.key),
        "POP3D_CLEARTEXT_AUTH_FROM": "none",
    }
    with ServeProcess(*serve_args(site, "--no-admin")[2:], env=env) as proc:
        proc.wait_ready()
        assert list(proc.pop3) == ["pop3s"]
        pop = poplib.POP3_SSL("localhost", proc.pop3["pop3s"][1], timeout=10, context=certs.client_context())
        assert "STLS" not in pop.capa()
        pop.user("alice")
        pop.pass_("wonderland")
        assert pop.retr(2)[1] == SECOND.split(b"\n")[:-1]
        pop.quit()


def test_tls_settings_from_toml(site: Path, certs: Certs) -> None:
    config = site / "pop3d.toml"
    config.write_text(
        f'listen = ["127.0.0.1:0"]\nlisten-tls = ["127.0.0.1:0"]\ntls-cert = "{certs.cert}"\n'
        f'tls-key = "{certs.key}"\ncleartext-auth-from = "none"\n'
        f'users = "{site / "users"}"\nmail-root = "{site / "mail"}"\nno-admin = true\n'
    )
    with ServeProcess("--config", str(config)) as proc:
        proc.wait_ready()
        assert sorted(proc.pop3) == ["pop3", "pop3s"]
        pop = poplib.POP3("localhost", proc.port, timeout=10)
        with pytest.raises(poplib.error_proto, match="use STLS first"):
            pop.user("alice")
        pop.quit()
        context = ssl.create_default_context(cafile=str(certs.ca_file))
        pop = poplib.POP3_SSL("localhost", proc.pop3["pop3s"][1], timeout=10, context=context)
        pop.user("alice")
        pop.pass_("wonderland")
        pop.quit()
