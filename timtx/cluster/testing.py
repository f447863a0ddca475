# -*- test-case-name: timtx.test.test_membership -*-
"""
Helpers for tests of clusters, here and in projects built on timtx.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Iterable


def clusterCertificates(
    directory: str, names: Iterable[str], hosts: Iterable[str] = ("127.0.0.1", "localhost"), ca: str = "cluster CA"
) -> tuple[str, dict[str, tuple[str, str]]]:
    """
    Write a cluster CA and, for each of C{names}, a node certificate it
    issued, valid for C{hosts} (IP addresses and DNS names), into
    C{directory}.

    @return: the CA certificate's path, and for each name the paths of its
        certificate and key (PEM).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca)])
    caCert = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(caKey, hashes.SHA256())
    )
    caPath = os.path.join(directory, "ca.pem")
    with open(caPath, "wb") as f:
        f.write(caCert.public_bytes(serialization.Encoding.PEM))

    alternatives: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alternatives.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alternatives.append(x509.DNSName(host))

    issued: dict[str, tuple[str, str]] = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(caName)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(caKey, hashes.SHA256())
        )
        certPath = os.path.join(directory, f"{name}.pem")
        keyPath = os.path.join(directory, f"{name}.key")
        with open(certPath, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(keyPath, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        issued[name] = (certPath, keyPath)
    return caPath, issued
