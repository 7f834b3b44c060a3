//! The admin page's server-side sessions: who is logged in, the CSRF token, a message for the next
//! page. The handlers (`page`, `api`, `actions`) see a [`Session`]; `auth` creates and checks them.
//! Apart from `auth`, so that the handlers need not depend on it (nor it on them, as before).

use super::WebError;
use crate::lock;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sessions end this long after login (or first request).
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Most sessions kept; beyond it the oldest is dropped, so a client looping without cookies cannot
/// exhaust memory.
const MAX_SESSIONS: usize = 10_000;

/// One client's session, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Session {
    /// The cookie value.
    pub id: String,
    /// The logged-in user; None without accounts (or before login).
    pub user: Option<String>,
    /// The peer address of the request being served (set on each request, not kept with the
    /// session), so that actions are logged with where they came from.
    pub client: Option<IpAddr>,
    /// The token every POST of this session must carry.
    pub csrf: String,
    created: Instant,
    /// A message to show once on the next page (the result of an action).
    flash: Option<String>,
}

impl Session {
    /// Who did something, for the log.
    pub fn who(&self) -> &str {
        self.user.as_deref().unwrap_or("-")
    }

    /// Where the request came from, for the log ("-" when unknown).
    pub fn client_text(&self) -> String {
        self.client.map_or_else(|| "-".to_string(), |ip| ip.to_string())
    }
}

/// All sessions by ID.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        lock(&self.map)
    }

    /// A new session, evicting expired ones (and the oldest when full).
    pub fn create(&self, user: Option<String>) -> Result<Session, WebError> {
        let session = Session {
            id: random_hex()?,
            user,
            client: None,
            csrf: random_hex()?,
            created: Instant::now(),
            flash: None,
        };
        let mut map = self.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, s| s.created.elapsed() < SESSION_LIFETIME);
            if let Some(oldest) = map.values().min_by_key(|s| s.created).map(|s| s.id.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(session.id.clone(), session.clone());
        Ok(session)
    }

    /// The live session with this ID.
    pub fn get(&self, id: &str) -> Option<Session> {
        let mut map = self.lock();
        match map.get(id) {
            Some(s) if s.created.elapsed() < SESSION_LIFETIME => Some(s.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Leaves a message for the session's next page.
    pub fn set_flash(&self, id: &str, text: String) {
        if let Some(s) = self.lock().get_mut(id) {
            s.flash = Some(text);
        }
    }

    /// Takes the message left for this page, if any.
    pub fn take_flash(&self, id: &str) -> Option<String> {
        self.lock().get_mut(id).and_then(|s| s.flash.take())
    }
}

/// 32 random bytes, hex-encoded.
fn random_hex() -> Result<String, WebError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| WebError::Internal(format!("no randomness: {e}")))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
