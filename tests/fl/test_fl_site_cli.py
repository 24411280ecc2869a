"""`medseg-site`: certificates and keys, and a bad dataset stops the site before anything connects."""

from __future__ import annotations

import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from client.certs import DeploymentFiles
from client.site_cli import main
from medseg_core.data.synthetic import make_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("site-cli")
    make_federation(root / "fed", n_sites=1, cases_per_site=2, seed=0, shape=(32, 32, 32), n_test=0)
    return root / "fed" / "site_00"


def test_certs_creates_a_ca_a_superlink_certificate_and_node_keys_flower_can_read(tmp_path, capsys):
    assert (
        main(
            [
                "certs",
                "--out",
                str(tmp_path / "c"),
                "--hosts",
                "127.0.0.1",
                "localhost",
                "--sites",
                "hospital_a",
            ]
        )
        == 0
    )
    files = DeploymentFiles(tmp_path / "c")
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.superlink_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert isinstance(
        load_ssh_private_key(files.node_key("hospital_a").read_bytes(), None), ec.EllipticCurvePrivateKey
    )
    assert isinstance(
        load_ssh_public_key(files.node_pub("hospital_a").read_bytes()), ec.EllipticCurvePublicKey
    )
    assert oct(files.node_key("hospital_a").stat().st_mode)[-3:] == "600"
    before = files.ca_cert.read_bytes()
    assert main(["certs", "--out", str(tmp_path / "c"), "--sites", "hospital_b"]) == 0  # adds, keeps the CA
    assert files.ca_cert.read_bytes() == before and files.node_key("hospital_b").is_file()
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["certs", "--out", str(tmp_path / "d"), "--hosts"]) == 2  # no host for a new certificate


def test_run_validates_then_shows_the_supernode_command(fed, tmp_path, capsys):
    cert = tmp_path / "ca.crt"
    cert.write_text("x")
    code = main(
        [
            "run",
            "--site-dir",
            str(fed),
            "--state-dir",
            str(tmp_path / "state"),
            "--site-id",
            "hospital_a",
            "--superlink",
            "link.example.org:9092",
            "--root-certificates",
            str(cert),
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "OK:" in out
    assert "flower-supernode --superlink link.example.org:9092" in out
    assert f'site-dir="{fed}"' in out and 'site-id="hospital_a"' in out and "--root-certificates" in out
    assert not (tmp_path / "state").exists()  # a dry run leaves nothing behind
    assert main(["run", "--site-dir", str(fed), "--superlink", "x:1", "--dry-run"]) == 2  # TLS is required


def test_a_bad_dataset_stops_the_site_with_the_validation_report(fed, tmp_path, capsys):
    bad = tmp_path / "site_bad"
    shutil.copytree(fed, bad)
    label = sorted((bad / "labelsTr").iterdir())[0]
    label.write_bytes(b"not a nifti file")
    code = main(["run", "--site-dir", str(bad), "--superlink", "x:1", "--insecure"])
    captured = capsys.readouterr()
    assert code == 1
    assert str(label) in captured.out and "FAILED" in captured.out
    assert "SuperNode was not started" in captured.err
    assert main(["validate", str(bad)]) == 1
