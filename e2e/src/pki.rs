//! The cluster's PKI, generated in pure Rust: one CA, the apiserver's serving certificate, a
//! client certificate per identity, and the ServiceAccount token signing key.
//!
//! All keys are ECDSA P-256, which Kubernetes accepts everywhere (serving, client and
//! ServiceAccount signing, ES256) and which is generated in microseconds.
use std::{
    fs,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The PKI could not be generated or written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    #[error("cannot write {path}: {source} (is the state directory writable?)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertAndKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A client identity as Kubernetes authenticates it: user = CN, groups = O.
#[derive(Debug, Clone)]
pub struct ClientIdentity<'a> {
    /// Names the files `<file_stem>.crt` and `<file_stem>.key`.
    pub file_stem: &'a str,
    pub user: &'a str,
    pub groups: &'a [&'a str],
}

/// A CA that keeps its key in memory to sign further certificates.
pub struct CertificateAuthority {
    dir: PathBuf,
    cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Creates a CA in `dir` as `<file_stem>.crt` and `<file_stem>.key`.
    pub fn create(dir: &Path, file_stem: &str, common_name: &str) -> Result<Self, PkiError> {
        let key = generate_key(file_stem)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|source| generate_error(file_stem, source))?;
        let cert_path = dir.join(format!("{file_stem}.crt"));
        write(&cert_path, &cert.pem())?;
        write(&dir.join(format!("{file_stem}.key")), &key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            cert_path,
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// Issues a server certificate `<file_stem>.crt` valid for `subject_alt_names` (IPs or DNS
    /// names).
    pub fn issue_server(
        &self,
        file_stem: &str,
        common_name: &str,
        subject_alt_names: Vec<String>,
    ) -> Result<CertAndKey, PkiError> {
        let mut params = CertificateParams::new(subject_alt_names)
            .map_err(|source| generate_error(file_stem, source))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file_stem, params)
    }

    /// Issues a client certificate for `identity`.
    pub fn issue_client(&self, identity: &ClientIdentity<'_>) -> Result<CertAndKey, PkiError> {
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, identity.user);
        for group in identity.groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(identity.file_stem, params)
    }

    fn issue(
        &self,
        file_stem: &str,
        mut params: CertificateParams,
    ) -> Result<CertAndKey, PkiError> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = generate_key(file_stem)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| generate_error(file_stem, source))?;
        let files = CertAndKey {
            cert: self.dir.join(format!("{file_stem}.crt")),
            key: self.dir.join(format!("{file_stem}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

/// The key pair that signs and verifies ServiceAccount tokens.
#[derive(Debug, Clone)]
pub struct ServiceAccountKey {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
}

impl ServiceAccountKey {
    /// Creates `sa.key` and `sa.pub` in `dir`.
    pub fn create(dir: &Path) -> Result<Self, PkiError> {
        let key = generate_key("the ServiceAccount signing key")?;
        let files = Self {
            private_key: dir.join("sa.key"),
            public_key: dir.join("sa.pub"),
        };
        write(&files.private_key, &key.serialize_pem())?;
        write(&files.public_key, &key.public_key_pem())?;
        Ok(files)
    }
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| generate_error(what, source))
}

fn generate_error(what: &str, source: rcgen::Error) -> PkiError {
    PkiError::Generate {
        what: what.to_owned(),
        source,
    }
}

fn write(path: &Path, pem: &str) -> Result<(), PkiError> {
    fs::write(path, pem).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}
