//! The site's directory as a recipient source (`recipients_ldap`, issue 15): a subtree search with
//! the domain's filter; one entry or more means the address exists.
//!
//! One connection per domain is opened at the first lookup, bound once, and shared by every
//! session: LDAP multiplexes operations over one connection by message ID (RFC 4511 4.1.1), so
//! concurrent RCPTs do not queue behind each other. When it breaks (the directory restarted, or
//! closed it for idleness as Active Directory does after `MaxConnIdleTime`), the next lookup opens
//! another.

use crate::config::{LdapSource, LdapUrl, read_ca_file, read_password};
use crate::lock;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchOptions, SearchResult};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why the directory gave no answer. None of these says anything about the address.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("bind as {dn:?} refused: {reason}")]
    Bind { dn: String, reason: String },
    #[error("search failed: {0}")]
    Search(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// One domain's directory.
pub struct Directory {
    /// The URL as configured, for connecting and for logs.
    url: String,
    source: LdapSource,
    /// The DN and the password read from `password_file` at start (and at every reload).
    bind: Option<(String, String)>,
    settings: LdapConnSettings,
    timeout: Duration,
    /// The open connection, if any; a handle is a cheap clone onto the same connection.
    connection: Mutex<Option<Ldap>>,
    /// Held while one lookup opens a connection, so a burst of RCPTs after an outage makes one
    /// connection, not one each.
    connecting: tokio::sync::Mutex<()>,
}

impl Directory {
    /// Reads the password and the CA file and builds the TLS settings; connects at the first lookup.
    pub fn new(source: &LdapSource) -> Result<Directory, String> {
        let url = source.parsed_url()?;
        let bind = match (&source.bind_dn, &source.password_file) {
            (Some(dn), Some(path)) => Some((dn.clone(), read_password(path)?)),
            _ => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = &source.ca_file {
            for cert in read_ca_file(path)? {
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let timeout = source.timeout.0;
        let settings =
            LdapConnSettings::new().set_conn_timeout(timeout).set_starttls(source.starttls).set_config(Arc::new(tls));
        if bind.is_some() && !url.tls && !source.starttls && !is_loopback(&url) {
            tracing::warn!(url = %source.url, "recipients_ldap sends the bind password in clear text: use ldaps:// or starttls");
        }
        Ok(Directory {
            url: source.url.clone(),
            source: source.clone(),
            bind,
            settings,
            timeout,
            connection: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// The URL, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Does the directory know `address`? Bounded by the source's `timeout` in all.
    pub async fn exists(&self, address: &str) -> Result<bool, DirectoryError> {
        match tokio::time::timeout(self.timeout, self.ask(address)).await {
            Ok(answer) => answer,
            Err(_) => {
                // A connection that let a search time out may be wedged: start afresh next time.
                self.forget_connection();
                Err(DirectoryError::Timeout(self.timeout))
            }
        }
    }

    async fn ask(&self, address: &str) -> Result<bool, DirectoryError> {
        let (mut ldap, fresh) = self.connection().await?;
        match self.search(&mut ldap, address).await {
            Ok(found) => Ok(found),
            Err(err) => {
                self.forget_connection();
                if fresh {
                    return Err(err);
                }
                // A kept connection may have been closed by the server since the last lookup
                // without us noticing yet: one more try on a new one before giving up.
                tracing::debug!(url = %self.url, error = %err, "directory connection went stale; reconnecting");
                let (mut ldap, _) = self.connection().await?;
                let answer = self.search(&mut ldap, address).await;
                if answer.is_err() {
                    self.forget_connection();
                }
                answer
            }
        }
    }

    /// The kept connection, or a new one (then `true`).
    async fn connection(&self) -> Result<(Ldap, bool), DirectoryError> {
        if let Some(ldap) = self.kept() {
            return Ok((ldap, false));
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(ldap) = self.kept() {
            return Ok((ldap, false));
        }
        let ldap = self.connect().await?;
        *lock(&self.connection) = Some(ldap.clone());
        Ok((ldap, true))
    }

    fn kept(&self) -> Option<Ldap> {
        let mut kept = lock(&self.connection);
        let ldap = kept.as_mut()?;
        if ldap.is_closed() { None } else { Some(ldap.clone()) }
    }

    fn forget_connection(&self) {
        lock(&self.connection).take();
    }

    /// Connects (TLS from the start for ldaps://, the StartTLS extended operation first for
    /// `starttls`, RFC 4511 4.14; the server identity check of RFC 4513 3.1.3 either way) and binds.
    async fn connect(&self) -> Result<Ldap, DirectoryError> {
        let (driver, mut ldap) = LdapConnAsync::with_settings(self.settings.clone(), &self.url)
            .await
            .map_err(|e| DirectoryError::Connect(e.to_string()))?;
        let url = self.url.clone();
        // The driver owns the socket; it ends when the last handle is dropped or the server closes.
        tokio::spawn(async move {
            if let Err(err) = driver.drive().await {
                tracing::debug!(url = %url, error = %err, "directory connection closed");
            }
        });
        if let Some((dn, password)) = &self.bind {
            let refused = |e: LdapError| DirectoryError::Bind { dn: dn.clone(), reason: e.to_string() };
            ldap.simple_bind(dn, password).await.map_err(refused)?.success().map_err(refused)?;
        }
        tracing::info!(url = %self.url, "connected to the directory");
        Ok(ldap)
    }

    async fn search(&self, ldap: &mut Ldap, address: &str) -> Result<bool, DirectoryError> {
        let filter = self.source.filter_for(address);
        let failed = |e: LdapError| DirectoryError::Search(e.to_string());
        // One entry decides, so ask for one and for no attributes ("1.1", RFC 4511 4.5.1.8).
        let SearchResult(entries, outcome) = ldap
            .with_search_options(SearchOptions::new().sizelimit(1))
            .search(&self.source.base, Scope::Subtree, &filter, vec!["1.1"])
            .await
            .map_err(failed)?;
        match outcome.rc {
            0 => Ok(!entries.is_empty()),
            // sizeLimitExceeded with an entry in hand: more than one matched, which is a yes.
            4 if !entries.is_empty() => Ok(true),
            _ => Err(failed(LdapError::from(outcome))),
        }
    }
}

fn is_loopback(url: &LdapUrl) -> bool {
    url.host.eq_ignore_ascii_case("localhost") || url.host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
