//! JWTs (`--jwt-key FILE`): verified with an HS256 secret or an RS256, ES256 or
//! EdDSA public key, by the jsonwebtoken crate. Claims: `sub` (the identity), `exp`
//! (checked with no leeway, and enforced while connected), and `hubcast`, the same
//! permission tables as an auth file's user.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{valid_identity, AuthError, Identity, Method, PermissionSpec};

/// The claims hubcast reads and `hubcast token` writes.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
    #[serde(default)]
    hubcast: Option<PermissionSpec>,
}

/// A key to verify JWTs with, read from a file.
pub struct JwtKey {
    key: DecodingKey,
    algorithms: Vec<Algorithm>,
    path: PathBuf,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("algorithms", &self.algorithms)
            .field("path", &self.path)
            .finish()
    }
}

/// The key file's contents: a PEM key, or an HS256 secret (its trailing newline is
/// not part of it).
fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes =
        std::fs::read(path).map_err(|e| format!("cannot read key {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(format!("key {} is empty", path.display()));
    }
    Ok(bytes)
}

fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

impl JwtKey {
    /// Reads a key file: a public key PEM (RSA, EC P-256, Ed25519) or an HS256 secret.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or is a PEM that is no public key of those kinds.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = read_key(path)?;
        let (key, algorithms) = if is_pem(&bytes) {
            if let Ok(key) = DecodingKey::from_rsa_pem(&bytes) {
                (key, vec![Algorithm::RS256])
            } else if let Ok(key) = DecodingKey::from_ec_pem(&bytes) {
                (key, vec![Algorithm::ES256])
            } else if let Ok(key) = DecodingKey::from_ed_pem(&bytes) {
                (key, vec![Algorithm::EdDSA])
            } else {
                return Err(format!(
                    "key {} is a PEM file but not an RSA, EC (P-256) or Ed25519 public key",
                    path.display()
                ));
            }
        } else {
            if bytes.len() < 32 {
                return Err(format!(
                    "key {} is an HS256 secret of {} bytes; use at least 32",
                    path.display(),
                    bytes.len()
                ));
            }
            (DecodingKey::from_secret(&bytes), vec![Algorithm::HS256])
        };
        Ok(JwtKey {
            key,
            algorithms,
            path: path.to_path_buf(),
        })
    }

    pub(super) fn reload(&self) -> Result<Self, String> {
        Self::load(&self.path)
    }

    /// Verifies a JWT: signature, algorithm, `exp`, `sub`.
    ///
    /// # Errors
    ///
    /// [`AuthError::Expired`] past `exp`, else [`AuthError::Failed`] saying why.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let mut validation = Validation::new(self.algorithms[0]);
        validation.algorithms = self.algorithms.clone();
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.required_spec_claims = ["sub".to_string()].into_iter().collect();
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &validation).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Failed(format!("the JWT does not verify: {e}")),
            }
        })?;
        let claims = data.claims;
        valid_identity(&claims.sub).map_err(|e| AuthError::Failed(format!("sub: {e}")))?;
        let permissions = claims
            .hubcast
            .unwrap_or_default()
            .compile(&claims.sub)
            .map_err(|e| AuthError::Failed(format!("the hubcast claim: {e}")))?;
        Ok(Identity {
            expires: claims.exp.map(|exp| UNIX_EPOCH + Duration::from_secs(exp)),
            name: claims.sub,
            permissions: Arc::new(permissions),
            method: Method::Jwt,
        })
    }
}

/// Signs a JWT for `sub` with the key in `key_file` (an HS256 secret, or an RSA, EC
/// P-256 or Ed25519 private key PEM), valid for `valid_for`, carrying `permissions`
/// as its `hubcast` claim: what `hubcast token` prints.
///
/// # Errors
///
/// The key cannot be read or used, or `sub` is not a valid identity.
pub fn mint_token(
    key_file: &Path,
    sub: &str,
    valid_for: Option<Duration>,
    permissions: &PermissionSpec,
) -> Result<String, String> {
    valid_identity(sub)?;
    let bytes = read_key(key_file)?;
    let (key, algorithm) = if is_pem(&bytes) {
        if let Ok(key) = EncodingKey::from_rsa_pem(&bytes) {
            (key, Algorithm::RS256)
        } else if let Ok(key) = EncodingKey::from_ec_pem(&bytes) {
            (key, Algorithm::ES256)
        } else if let Ok(key) = EncodingKey::from_ed_pem(&bytes) {
            (key, Algorithm::EdDSA)
        } else {
            return Err(format!(
                "key {} is a PEM file but not an RSA, EC (P-256) or Ed25519 private key",
                key_file.display()
            ));
        }
    } else {
        (EncodingKey::from_secret(&bytes), Algorithm::HS256)
    };
    let now = super::unix_now();
    let claims = Claims {
        sub: sub.to_string(),
        exp: valid_for.map(|d| now + d.as_secs()),
        iat: Some(now),
        hubcast: Some(permissions.clone()),
    };
    jsonwebtoken::encode(&Header::new(algorithm), &claims, &key)
        .map_err(|e| format!("cannot sign with {}: {e}", key_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_file() -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("jwt.secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").unwrap();
        (dir, path)
    }

    /// A directory removed when dropped (std only).
    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let path = std::env::temp_dir().join(format!(
                    "hubcast-jwt-{}-{}",
                    std::process::id(),
                    fastrand::u64(..)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn minted_tokens_verify_with_their_permissions() {
        let (_dir, path) = secret_file();
        let key = JwtKey::load(&path).unwrap();
        let spec = PermissionSpec {
            publish: Some(super::super::RuleSpec {
                allow: vec!["room.{user}".into()],
                deny: vec![],
            }),
            ..Default::default()
        };
        let token = mint_token(&path, "alice", Some(Duration::from_secs(60)), &spec).unwrap();
        let id = key.verify(&token).unwrap();
        assert_eq!(id.name, "alice");
        assert!(id.permissions.publish.allows("room.alice"));
        assert!(!id.permissions.subscribe.allows("room.alice"));
        assert!(id.expires.is_some());
        // Tampered: fails.
        let mut bad = token.clone();
        bad.pop();
        assert!(matches!(key.verify(&bad), Err(AuthError::Failed(_))));
    }

    #[test]
    fn expired_tokens_are_expired() {
        let (_dir, path) = secret_file();
        let key = JwtKey::load(&path).unwrap();
        let claims = Claims {
            sub: "bob".into(),
            exp: Some(super::super::unix_now() - 10),
            iat: None,
            hubcast: None,
        };
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(key.verify(&token).unwrap_err(), AuthError::Expired);
    }

    #[test]
    fn short_secrets_are_refused() {
        let dir = tempdir::Dir::new();
        let path = dir.path().join("short");
        std::fs::write(&path, "short").unwrap();
        assert!(JwtKey::load(&path).unwrap_err().contains("at least 32"));
    }
}
