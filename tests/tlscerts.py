"""Throwaway X.509 certificates for the DICOM TLS tests, made with the ``openssl`` CLI."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


@dataclass(frozen=True)
class KeyPair:
    key: Path
    certificate: Path


def make_ca(folder: Path, name: str) -> KeyPair:
    """A self-signed CA."""
    folder.mkdir(parents=True, exist_ok=True)
    key, crt = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", DAYS,
        "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return KeyPair(key, crt)


def issue(folder: Path, name: str, ca: KeyPair, common_name: str, *, server: bool) -> KeyPair:
    """A leaf certificate signed by ``ca``: a server one for 127.0.0.1, or a client one."""
    key, csr, crt = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    extensions = folder / f"{name}.ext"
    usage = "serverAuth" if server else "clientAuth"
    lines = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}"]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
        "-out", str(csr), "-subj", f"/O=pacsnode tests/CN={common_name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.certificate), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", DAYS, "-out", str(crt), "-extfile", str(extensions),
        cwd=folder,
    )  # fmt: skip
    return KeyPair(key, crt)


@dataclass(frozen=True)
class Pki:
    """Our CA with a node and a client certificate, and a stranger CA with its own client."""

    ca: KeyPair
    node: KeyPair
    client: KeyPair
    stranger: KeyPair

    @classmethod
    def create(cls, folder: Path) -> Pki:
        ca = make_ca(folder, "test-ca")
        other = make_ca(folder, "stranger-ca")
        return cls(
            ca=ca,
            node=issue(folder, "node", ca, "127.0.0.1", server=True),
            client=issue(folder, "client", ca, "MODALITY1", server=False),
            stranger=issue(folder, "stranger", other, "INTRUDER", server=False),
        )

    def node_toml(self, *, mutual: bool) -> str:
        """``[node.tls]`` for a node serving with ``node``; ``mutual`` adds ``client_ca``."""
        lines = [
            "[node.tls]",
            "enabled = true",
            f'certificate = "{self.node.certificate}"',
            f'private_key = "{self.node.key}"',
        ]
        if mutual:
            lines.append(f'client_ca = "{self.ca.certificate}"')
        return "\n".join(lines) + "\n"
