"""Keys and certificates for a deployment: a CA, the SuperLink's TLS certificate, per-site node keys.

Written with ``cryptography`` (already a dependency of Flower) instead of shelling out to ``openssl``
and ``ssh-keygen``, so it works the same on every machine::

    <out>/ca.crt  ca.key                    certificate authority (keep ca.key offline)
    <out>/superlink.crt  superlink.key      the SuperLink's TLS certificate (SANs: --hosts) and key
    <out>/sites/<site>/node.key  node.pub   a site's node-authentication key pair (ECDSA P-384,
                                            OpenSSH format, what flower-supernode / flwr supernode
                                            register read); node.key never leaves the site

Nothing existing is overwritten: running the command again only adds what is missing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medseg_core.federation import check_safe_name

VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for a server certificate


@dataclass(frozen=True)
class DeploymentFiles:
    """Paths of what :func:`make_deployment_files` writes."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def superlink_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    def node_key(self, site: str) -> Path:
        return self.root / "sites" / check_safe_name(site, "site id") / "node.key"

    def node_pub(self, site: str) -> Path:
        return self.root / "sites" / check_safe_name(site, "site id") / "node.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _load_ca(files: DeploymentFiles) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return cert, key


def make_ca(files: DeploymentFiles, name: str = "medseg federation CA") -> None:
    """A self-signed certificate authority (EC P-384)."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA384())
    )
    _write(files.ca_key, _pem_key(key), private=True)
    _write(files.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_superlink_cert(files: DeploymentFiles, hosts: Sequence[str]) -> None:
    """The SuperLink's TLS certificate, signed by the CA, valid for ``hosts`` (IPs or DNS names).

    Raises:
        ValueError: no host.
    """
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address (--hosts)")
    ca_cert, ca_key = _load_ca(files)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(files.superlink_key, _pem_key(key), private=True)
    _write(files.superlink_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_node_keys(files: DeploymentFiles, site: str) -> None:
    """A site's node-authentication key pair (ECDSA P-384, OpenSSH format)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(files.node_key(site), private, private=True)
    _write(files.node_pub(site), public + f" {site}\n".encode(), private=False)


def make_deployment_files(
    out: str | Path, *, hosts: Sequence[str] = (), sites: Sequence[str] = (), log=print
) -> DeploymentFiles:
    """Create whatever is missing under ``out``: the CA, the SuperLink certificate, per-site keys.

    Args:
        out: folder to write to.
        hosts: the SuperLink's host names / IP addresses (needed when its certificate is created).
        sites: site ids to create node keys for.
        log: progress output.

    Returns:
        The paths.

    Raises:
        ValueError: no ``hosts`` while the SuperLink certificate is missing, or a bad site id.
    """
    files = DeploymentFiles(Path(out))
    for site in sites:
        check_safe_name(site, "site id")
    if not files.ca_cert.exists():
        make_ca(files)
        log(f"created CA {files.ca_cert} (keep {files.ca_key} offline)")
    if not files.superlink_cert.exists():
        make_superlink_cert(files, list(hosts))
        log(f"created SuperLink certificate {files.superlink_cert} for {list(hosts)}")
    for site in sites:
        if not files.node_key(site).exists():
            make_node_keys(files, site)
            log(
                f"created node keys of {site}: {files.node_key(site)} (stays at the site), {files.node_pub(site)}"
            )
    return files
