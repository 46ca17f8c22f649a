//! A throw-away certificate authority and a server certificate for the fakes (and for the
//! proxy's own local TLS listeners, via the PEM files).

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestPki {
    /// Holds the PEM files; removed on drop.
    pub dir: tempfile::TempDir,
    /// The CA certificate (trust anchor) as PEM.
    pub ca_pem_path: PathBuf,
    /// The leaf certificate (localhost, 127.0.0.1, 127.0.0.2, ::1) as PEM.
    pub cert_pem_path: PathBuf,
    /// The leaf's PKCS#8 private key as PEM.
    pub key_pem_path: PathBuf,
    /// Same content as the file at `ca_pem_path`.
    pub ca_pem: String,
    /// Leaf certificate PEM (same content as `cert_pem_path`).
    pub cert_pem: String,
    /// Leaf key PEM (same content as `key_pem_path`).
    pub key_pem: String,
    ca_der: CertificateDer<'static>,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// The rustls crypto provider used everywhere in the fakes.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl TestPki {
    /// A fresh CA and a leaf signed by it for DNS `localhost` and IPs 127.0.0.1, 127.0.0.2
    /// and ::1. PEM files are written into `dir`.
    pub fn new() -> TestPki {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "xoauth2-proxy test CA");
        ca_params
            .distinguished_name
            .push(DnType::OrganizationName, "xoauth2-proxy tests");
        ca_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
        ];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca self-sign");
        let issuer = Issuer::new(ca_params, ca_key);

        let mut leaf_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "127.0.0.2".to_string(),
            "::1".to_string(),
        ])
        .expect("leaf params");
        leaf_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        leaf_params.use_authority_key_identifier_extension = true;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .expect("leaf sign");

        let ca_pem = ca_cert.pem();
        let cert_pem = leaf_cert.pem();
        let key_pem = leaf_key.serialize_pem();

        let dir = tempfile::tempdir().expect("tempdir");
        let ca_pem_path = dir.path().join("ca.pem");
        let cert_pem_path = dir.path().join("cert.pem");
        let key_pem_path = dir.path().join("key.pem");
        std::fs::write(&ca_pem_path, &ca_pem).expect("write ca.pem");
        std::fs::write(&cert_pem_path, &cert_pem).expect("write cert.pem");
        std::fs::write(&key_pem_path, &key_pem).expect("write key.pem");

        TestPki {
            dir,
            ca_pem_path,
            cert_pem_path,
            key_pem_path,
            ca_pem,
            cert_pem,
            key_pem,
            ca_der: ca_cert.der().clone(),
            cert_der: leaf_cert.der().clone(),
            key_der: leaf_key.serialize_der(),
        }
    }

    /// Server config presenting the leaf certificate (chain: leaf, CA).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone(), self.ca_der.clone()], key)
            .expect("server cert");
        Arc::new(config)
    }

    /// Client config that trusts only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .expect("protocol versions")
                .with_root_certificates(self.root_store())
                .with_no_client_auth(),
        )
    }

    /// A root store holding only this CA.
    pub fn root_store(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add CA");
        roots
    }

    /// DER of the CA certificate.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}
