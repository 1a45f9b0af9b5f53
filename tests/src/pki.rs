//! Throwaway certificates for one test control plane, made in-process.
//!
//! - a serving CA and the API server's certificate for `localhost`, `127.0.0.1`, the
//!   in-cluster names of the `kubernetes` Service, and any addresses the caller adds (the
//!   real test node's address, the Service's cluster IP);
//! - a client CA, which the API server trusts, and an admin client certificate in group
//!   `system:masters` that every harness client (kube-rs, kubectl, helm, the controllers) uses;
//! - the service-account signing key and its public half (for token verification).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use crate::error::{HarnessError, Result};

/// Paths of the PEM files written by [`Pki::write`].
#[derive(Debug, Clone)]
pub struct Pki {
    pub serving_ca: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub client_ca: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

fn ca_params(common_name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(common_name, None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

impl Pki {
    /// Generates everything and writes it into `dir`.
    pub fn write(dir: &Path) -> Result<Self> {
        Self::write_with_names(dir, &[])
    }

    /// As [`Pki::write`], with `extra_names` (DNS names or IP addresses) added to the API
    /// server's certificate.
    pub fn write_with_names(dir: &Path, extra_names: &[String]) -> Result<Self> {
        let serving_ca = CertifiedIssuer::self_signed(
            ca_params("switchyard-test-serving-ca")?,
            KeyPair::generate()?,
        )?;
        let client_ca = CertifiedIssuer::self_signed(
            ca_params("switchyard-test-client-ca")?,
            KeyPair::generate()?,
        )?;

        let serving_key = KeyPair::generate()?;
        let mut names = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ];
        names.extend(extra_names.iter().cloned());
        let mut serving = CertificateParams::new(names)?;
        serving.distinguished_name = name("kube-apiserver", None);
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving.signed_by(&serving_key, &serving_ca)?;

        let admin_key = KeyPair::generate()?;
        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin.distinguished_name = name("switchyard-test-admin", Some("system:masters"));
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin.signed_by(&admin_key, &client_ca)?;

        let service_account_key = KeyPair::generate()?;

        let pki = Self {
            serving_ca: dir.join("serving-ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            client_ca: dir.join("client-ca.crt"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            service_account_key: dir.join("service-account.key"),
            service_account_public_key: dir.join("service-account.pub"),
        };
        let files = [
            (&pki.serving_ca, serving_ca.pem()),
            (&pki.serving_cert, serving_cert.pem()),
            (&pki.serving_key, serving_key.serialize_pem()),
            (&pki.client_ca, client_ca.pem()),
            (&pki.admin_cert, admin_cert.pem()),
            (&pki.admin_key, admin_key.serialize_pem()),
            (
                &pki.service_account_key,
                service_account_key.serialize_pem(),
            ),
            (
                &pki.service_account_public_key,
                service_account_key.public_key_pem(),
            ),
        ];
        for (path, pem) in files {
            std::fs::write(path, pem)
                .map_err(HarnessError::io(format!("writing {}", path.display())))?;
        }
        Ok(pki)
    }

    /// A kubeconfig for the admin user against `server`, with file references (so kubectl,
    /// helm, kube-rs and the Go controllers all read the same files).
    pub fn kubeconfig(&self, server: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: switchyard-test
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: admin
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: switchyard-test
  context:
    cluster: switchyard-test
    user: admin
current-context: switchyard-test
",
            ca = self.serving_ca.display(),
            cert = self.admin_cert.display(),
            key = self.admin_key.display(),
        )
    }
}
