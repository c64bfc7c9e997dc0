//! rustls configurations for the load generator and the upstream server: one provider (ring, as
//! the rest of the workspace uses), the lab's self-signed certificate, no session resumption (each
//! new connection is a full handshake, so every path pays the same).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::Error;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: the lab certificate (it names api.example.test and 198.19.0.10).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Error> {
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::msg(format!("{}: {e}", cert.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::msg(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| Error::msg(format!("{}: {e}", key.display())))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::msg(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::msg(e.to_string()))?;
    Ok(Arc::new(config))
}

/// The client side: trusts only the lab certificate; resumption off (full handshakes).
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| Error::msg(format!("{}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| Error::msg(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| Error::msg(format!("{}: {e}", ca.display())))?;
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::msg(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_owned()).map_err(|e| Error::msg(format!("{name}: {e}")))
}

/// The bytes of a real rustls ClientHello for `sni`: what the idle-connection scenario sends so
/// that every proxy peeks (and, for SNI rules, matches) before it splices.
pub fn client_hello(ca: &Path, sni: &str) -> Result<Vec<u8>, Error> {
    let config = client_config(ca)?;
    let mut conn = rustls::ClientConnection::new(config, server_name(sni)?)
        .map_err(|e| Error::msg(e.to_string()))?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    Ok(hello)
}
