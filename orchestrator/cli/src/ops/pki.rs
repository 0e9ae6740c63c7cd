//! The certificates of a NATS deployment (rcgen): two authorities and the certificates they
//! sign. The *server* authority signs the servers' certificates, which clients trust
//! (`ca.pem`) and servers present to each other on cluster routes; the *client* authority
//! signs one certificate per identity (orchestrator, node, automation), which a server maps
//! to a user. Two authorities keep the roles apart: a node's certificate cannot join the
//! cluster as a route, and a server's cannot log in as a client.
//!
//! An authority's key is written once (mode 0600) and read back to issue more certificates
//! (`cairn ops nats-add-node`); its parameters are rebuilt from its name, so a reloaded
//! authority signs exactly as the one that made its certificate.

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// A certificate or key that could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// rcgen refused the parameters or the key.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being made.
        what: String,
        /// Why.
        source: rcgen::Error,
    },
    /// A host name cannot go into a certificate.
    #[error("host {host:?} cannot be named in a certificate: {reason}")]
    BadHost {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
}

fn rcgen_error(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Error {
    let what = what.into();
    move |source| Error::Rcgen { what, source }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8); written with mode 0600.
    pub key_pem: String,
}

/// One of the deployment's certificate authorities.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority(..)")
    }
}

/// How long certificates are valid: from an hour ago (clocks differ a little) for `days`.
fn validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

fn serial(params: &mut CertificateParams) {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).expect("the system's random source");
    bytes[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&bytes));
}

fn ca_params(common_name: &str) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(rcgen_error(format!("parameters of CA {common_name}")))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

impl Authority {
    /// A new authority named `common_name`, valid for `days`: its certificate and key.
    pub fn create(common_name: &str, days: u32) -> Result<(Authority, Issued), Error> {
        let mut params = ca_params(common_name)?;
        validity(&mut params, days);
        serial(&mut params);
        let key = KeyPair::generate().map_err(rcgen_error(format!("key of CA {common_name}")))?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_error(format!("certificate of CA {common_name}")))?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok((
            Authority {
                issuer: Issuer::new(ca_params(common_name)?, key),
            },
            issued,
        ))
    }

    /// The authority named `common_name` whose key is `key_pem` (as [`Authority::create`]
    /// wrote it).
    pub fn load(common_name: &str, key_pem: &str) -> Result<Authority, Error> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(rcgen_error(format!("the key of CA {common_name}")))?;
        Ok(Authority {
            issuer: Issuer::new(ca_params(common_name)?, key),
        })
    }

    fn issue(&self, mut params: CertificateParams, what: &str, days: u32) -> Result<Issued, Error> {
        validity(&mut params, days);
        serial(&mut params);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(rcgen_error(format!("key of {what}")))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_error(format!("certificate of {what}")))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server's certificate: `common_name`, every host in `hosts` (names or addresses) as
    /// subject alternative names, usable to serve clients and to dial and accept routes.
    pub fn issue_server(
        &self,
        common_name: &str,
        hosts: &[String],
        days: u32,
    ) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(rcgen_error(format!("parameters of {common_name}")))?;
        for host in hosts {
            let san = match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    SanType::DnsName(host.as_str().try_into().map_err(|e: rcgen::Error| {
                        Error::BadHost {
                            host: host.clone(),
                            reason: e.to_string(),
                        }
                    })?)
                }
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(params, common_name, days)
    }

    /// A client's certificate whose subject is `CN=<common_name>` (the NATS user it maps to).
    pub fn issue_client(&self, common_name: &str, days: u32) -> Result<Issued, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(rcgen_error(format!("parameters of {common_name}")))?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, common_name, days)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reloaded_authority_signs_like_the_one_that_was_made() {
        let (made, ca) = Authority::create("cairn NATS client CA", 10).unwrap();
        let again = Authority::load("cairn NATS client CA", &ca.key_pem).unwrap();
        let first = made.issue_client("cairn-node-kvm-01", 10).unwrap();
        let second = again.issue_client("cairn-node-kvm-02", 10).unwrap();
        assert!(first.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(second.key_pem.contains("PRIVATE KEY"));
        assert_ne!(first.key_pem, second.key_pem);
        assert!(Authority::load("x", "not a key").is_err());
    }

    #[test]
    fn server_hosts_become_alternative_names() {
        let (ca, _) = Authority::create("cairn NATS server CA", 10).unwrap();
        let hosts = ["nats-1.example.net", "127.0.0.1", "::1", "127.0.0.1"].map(String::from);
        let issued = ca.issue_server("nats-1", &hosts, 10).unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }
}
