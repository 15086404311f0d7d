//! Authentication: who a connection is, and what it may do.
//!
//! An [`Authenticator`] knows the users of an auth file (`--auth FILE`: names, token
//! hashes, permissions) and, optionally, a key to verify JWTs with (`--jwt-key FILE`).
//! A client proves who it is with its first frame, `$hello {"user"?, "token"}`; a TLS
//! client certificate can do it instead (its name is looked up in the auth file). The
//! result is an [`Identity`]: a name and compiled [`Permissions`].
//!
//! Secrets are never kept: the file holds `sha256:SALT:DIGEST` (salted SHA-256, for
//! machine tokens: long random secrets, where a slow password hash buys nothing and
//! costs every connect), compared in constant time. A wrong token costs its address a
//! growing wait before its next attempt is read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

mod jwt;
mod penalty;
mod rules;

pub use jwt::{mint_token, JwtKey};
pub(crate) use penalty::Penalties;
pub use rules::{valid_identity, ConsumeRule, PermissionSpec, Permissions, Rule, RuleSpec};

/// Bytes of random salt in a token hash.
const SALT_BYTES: usize = 16;
/// What a token hash starts with.
const HASH_SCHEME: &str = "sha256";

/// Why a `$hello` did not authenticate. The client is told only "invalid
/// credentials" (never which part was wrong); the message is for the hub's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The token (or user) is wrong, or the JWT does not verify.
    #[error("{0}")]
    Failed(String),
    /// The JWT has expired.
    #[error("the token expired")]
    Expired,
}

/// Who a connection is and what it may do.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its name (the auth file's `name`, a JWT's `sub`, a certificate's name).
    pub name: String,
    /// What it may do.
    pub permissions: Arc<Permissions>,
    /// When its credentials expire (a JWT's `exp`).
    pub expires: Option<SystemTime>,
    /// How it proved who it is.
    pub method: Method,
}

/// How an identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Method {
    /// A user of the auth file, by token.
    Token,
    /// A JWT verified with the hub's key.
    Jwt,
    /// A TLS client certificate.
    Certificate,
}

impl Method {
    /// As `$welcome` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Token => "token",
            Method::Jwt => "jwt",
            Method::Certificate => "certificate",
        }
    }
}

/// The auth file as written (`--auth FILE`, TOML).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// Its users.
    #[serde(default)]
    pub users: Vec<UserSpec>,
}

/// One `[[users]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The user's name.
    pub name: String,
    /// The token's hash, as `hubcast auth hash` prints it (optional for users that
    /// only connect with a client certificate).
    #[serde(default)]
    pub token_hash: Option<String>,
    /// The permissions.
    #[serde(flatten)]
    pub permissions: PermissionSpec,
}

struct User {
    hash: Option<TokenHash>,
    permissions: Arc<Permissions>,
}

/// Verifies `$hello` tokens and client certificates against the auth file and the JWT
/// key; cheap to share (`Arc`), replaced whole on reload.
pub struct Authenticator {
    users: HashMap<String, User>,
    /// A hash to compare against when the user is unknown, so that the answer takes
    /// the same time either way.
    decoy: TokenHash,
    jwt: Option<JwtKey>,
    /// The auth file, for reloading.
    file: Option<PathBuf>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("users", &self.users.len())
            .field("jwt", &self.jwt.is_some())
            .field("file", &self.file)
            .finish()
    }
}

impl Authenticator {
    /// Reads the auth file (if any) and the JWT key (if any).
    ///
    /// # Errors
    ///
    /// A sentence naming the file and what is wrong in it (the TOML parser's line and
    /// column included).
    pub fn load(auth_file: Option<&Path>, jwt_key: Option<&Path>) -> Result<Self, String> {
        let spec = match auth_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read auth file {}: {e}", path.display()))?;
                toml::from_str::<AuthFile>(&text)
                    .map_err(|e| format!("auth file {}: {e}", path.display()))?
            }
            None => AuthFile::default(),
        };
        let jwt = jwt_key.map(JwtKey::load).transpose()?;
        let mut auth = Self::from_spec(&spec, jwt).map_err(|e| match auth_file {
            Some(path) => format!("auth file {}: {e}", path.display()),
            None => e,
        })?;
        auth.file = auth_file.map(Path::to_path_buf);
        Ok(auth)
    }

    /// Builds from an auth file already parsed, and an optional JWT key.
    ///
    /// # Errors
    ///
    /// A duplicate or invalid user name, a bad hash, or a bad pattern, named.
    pub fn from_spec(spec: &AuthFile, jwt: Option<JwtKey>) -> Result<Self, String> {
        let mut users = HashMap::new();
        for user in &spec.users {
            valid_identity(&user.name).map_err(|e| format!("user {:?}: {e}", user.name))?;
            let hash = user
                .token_hash
                .as_deref()
                .map(TokenHash::parse)
                .transpose()
                .map_err(|e| format!("user {:?}: token_hash: {e}", user.name))?;
            let permissions = user
                .permissions
                .compile(&user.name)
                .map_err(|e| format!("user {:?}: {e}", user.name))?;
            let fresh = users.insert(
                user.name.clone(),
                User {
                    hash,
                    permissions: Arc::new(permissions),
                },
            );
            if fresh.is_some() {
                return Err(format!("user {:?} appears twice", user.name));
            }
        }
        Ok(Authenticator {
            users,
            decoy: TokenHash::new(b"decoy"),
            jwt,
            file: None,
        })
    }

    /// Reads the same files again (on SIGHUP).
    ///
    /// # Errors
    ///
    /// As [`Authenticator::load`]; the caller keeps the old one.
    pub fn reload(&self) -> Result<Self, String> {
        let jwt = self.jwt.as_ref().map(JwtKey::reload).transpose()?;
        let mut fresh = match &self.file {
            Some(path) => Self::load(Some(path), None)?,
            None => Self::from_spec(&AuthFile::default(), None)?,
        };
        fresh.jwt = jwt;
        Ok(fresh)
    }

    /// How many users the auth file has.
    pub fn users(&self) -> usize {
        self.users.len()
    }

    /// Checks a `$hello`'s credentials.
    ///
    /// # Errors
    ///
    /// [`AuthError::Failed`] for a wrong token, unknown user or bad JWT;
    /// [`AuthError::Expired`] for an expired JWT.
    pub fn authenticate(&self, user: Option<&str>, token: &str) -> Result<Identity, AuthError> {
        if let Some(jwt) = self.jwt.as_ref().filter(|_| looks_like_jwt(token)) {
            let identity = jwt.verify(token)?;
            if user.is_some_and(|u| u != identity.name) {
                return Err(AuthError::Failed(format!(
                    "the JWT is for {:?}, not {:?}",
                    identity.name,
                    user.unwrap_or_default()
                )));
            }
            return Ok(identity);
        }
        let found = match user {
            Some(name) => match self.users.get(name) {
                Some(entry) => entry
                    .hash
                    .as_ref()
                    .filter(|hash| hash.verify(token.as_bytes()))
                    .map(|_| (name, entry)),
                None => {
                    // The same work as for a known user.
                    self.decoy.verify(token.as_bytes());
                    None
                }
            },
            // No name: the token alone says who (every user is tried, in constant time each).
            None => {
                let mut found = None;
                for (name, entry) in &self.users {
                    if entry
                        .hash
                        .as_ref()
                        .is_some_and(|hash| hash.verify(token.as_bytes()))
                    {
                        found = Some((name.as_str(), entry));
                    }
                }
                found
            }
        };
        match found {
            Some((name, entry)) => Ok(Identity {
                name: name.to_string(),
                permissions: Arc::clone(&entry.permissions),
                expires: None,
                method: Method::Token,
            }),
            None => Err(AuthError::Failed(match user {
                Some(name) => format!("wrong token for user {name:?} (or no such user)"),
                None => "the token matches no user".into(),
            })),
        }
    }

    /// The identity a verified client certificate names: the auth file's user of that
    /// name; without an auth file, everything is allowed (the CA vouched for it).
    ///
    /// # Errors
    ///
    /// The name is not a valid identity, or the auth file has no such user.
    pub fn certificate(&self, name: &str) -> Result<Identity, AuthError> {
        valid_identity(name).map_err(AuthError::Failed)?;
        let permissions = match self.users.get(name) {
            Some(user) => Arc::clone(&user.permissions),
            None if self.file.is_none() && self.users.is_empty() => Arc::new(
                PermissionSpec::everything()
                    .compile(name)
                    .expect("'>' is a valid pattern"),
            ),
            None => {
                return Err(AuthError::Failed(format!(
                    "the client certificate names {name:?}, who is not a user in the auth file"
                )))
            }
        };
        Ok(Identity {
            name: name.to_string(),
            permissions,
            expires: None,
            method: Method::Certificate,
        })
    }

    /// The permissions the current auth file gives `identity` (for a reload): `None`
    /// if it is no longer allowed in. JWT identities keep theirs until they expire.
    pub fn refresh(&self, identity: &Identity) -> Option<Arc<Permissions>> {
        match identity.method {
            Method::Jwt => self
                .jwt
                .is_some()
                .then(|| Arc::clone(&identity.permissions)),
            Method::Token => self
                .users
                .get(&identity.name)
                .filter(|user| user.hash.is_some())
                .map(|user| Arc::clone(&user.permissions)),
            Method::Certificate => self.certificate(&identity.name).ok().map(|i| i.permissions),
        }
    }
}

/// Whether `token` has a JWT's shape (three base64url parts).
fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3 && token.starts_with("eyJ")
}

/// A salted SHA-256 of a token: `sha256:SALT:DIGEST` (hex), DIGEST = SHA-256(SALT ‖ token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHash {
    salt: Vec<u8>,
    digest: Vec<u8>,
}

impl TokenHash {
    /// Hashes `secret` with a fresh random salt.
    pub fn new(secret: &[u8]) -> Self {
        let mut salt = vec![0u8; SALT_BYTES];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .expect("the system's random number generator works");
        let digest = digest(&salt, secret);
        TokenHash { salt, digest }
    }

    /// Parses `sha256:SALT:DIGEST`.
    ///
    /// # Errors
    ///
    /// Any other shape, named.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = text.split(':');
        let (Some(HASH_SCHEME), Some(salt), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected sha256:SALT:DIGEST, as `hubcast auth hash` prints".into());
        };
        let salt = from_hex(salt).ok_or("the salt is not hex")?;
        let digest = from_hex(digest)
            .filter(|d| d.len() == 32)
            .ok_or("the digest is not 64 hex digits")?;
        if salt.is_empty() {
            return Err("the salt is empty".into());
        }
        Ok(TokenHash { salt, digest })
    }

    /// Whether `secret` is the token, compared in constant time.
    pub fn verify(&self, secret: &[u8]) -> bool {
        digest(&self.salt, secret).ct_eq(&self.digest).into()
    }
}

impl std::fmt::Display for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{HASH_SCHEME}:{}:{}",
            to_hex(&self.salt),
            to_hex(&self.digest)
        )
    }
}

fn digest(salt: &[u8], secret: &[u8]) -> Vec<u8> {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    context.update(salt);
    context.update(secret);
    context.finish().as_ref().to_vec()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A random token of 32 bytes, base64url: for `hubcast auth hash --new`.
pub fn random_token() -> String {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system's random number generator works");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch, for JWT times.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_their_token_only() {
        let hash = TokenHash::new(b"s3cret");
        let text = hash.to_string();
        assert!(text.starts_with("sha256:"));
        let parsed = TokenHash::parse(&text).unwrap();
        assert!(parsed.verify(b"s3cret"));
        assert!(!parsed.verify(b"s3cret\n"));
        assert!(!parsed.verify(b""));
        assert!(TokenHash::parse("md5:00:11").is_err());
        assert!(TokenHash::parse("sha256:zz:00").is_err());
    }

    fn file(text: &str) -> Result<Authenticator, String> {
        let spec: AuthFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Authenticator::from_spec(&spec, None)
    }

    #[test]
    fn users_authenticate_by_token_with_or_without_a_name() {
        let hash = TokenHash::new(b"t1");
        let auth = file(&format!(
            "[[users]]\nname = \"vendor-acme\"\ntoken_hash = \"{hash}\"\npublish = {{ allow = [\"pickup\"] }}\n"
        ))
        .unwrap();
        let id = auth.authenticate(Some("vendor-acme"), "t1").unwrap();
        assert_eq!(id.name, "vendor-acme");
        assert!(id.permissions.publish.allows("pickup"));
        assert!(!id.permissions.subscribe.allows("pickup"));
        assert_eq!(auth.authenticate(None, "t1").unwrap().name, "vendor-acme");
        assert!(auth.authenticate(Some("vendor-acme"), "t2").is_err());
        assert!(auth.authenticate(Some("nobody"), "t1").is_err());
        assert!(auth.authenticate(None, "t2").is_err());
    }

    #[test]
    fn bad_files_are_refused_naming_the_problem() {
        let err = file("[[users]]\nname = \"a\"\ntokn_hash = \"x\"\n").unwrap_err();
        assert!(err.contains("tokn_hash"), "{err}");
        let err = file("[[users]]\nname = \">\"\n").unwrap_err();
        assert!(err.contains("may not contain"), "{err}");
        let err = file("[[users]]\nname = \"a\"\n[[users]]\nname = \"a\"\n").unwrap_err();
        assert!(err.contains("twice"), "{err}");
        let err = file("[[users]]\nname = \"a\"\npublish = { allow = [\"a..b\"] }\n").unwrap_err();
        assert!(err.contains("publish.allow"), "{err}");
    }
}
