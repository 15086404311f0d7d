//! X25519 key exchange from aws-lc-rs, for a provider that is otherwise *ring*'s.
//!
//! Every TLS 1.3 handshake, resumed or not, makes a key share and agrees on a secret
//! with the peer's: on this machine (AMD EPYC, adx) aws-lc-rs does the pair in ~45 µs
//! and *ring* in ~80 µs, a quarter of the hub's CPU per authenticated connect. Which
//! crate seals the records depends on the CPU: see `aead`.

use aws_lc_rs::agreement;
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved};

/// The X25519 group (RFC 7748), as rustls's providers name and check it.
#[derive(Debug)]
pub(crate) struct X25519;

impl SupportedKxGroup for X25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let private = agreement::EphemeralPrivateKey::generate(&agreement::X25519, &rng)
            .map_err(|_| Error::FailedToGetRandomBytes)?;
        let public = private
            .compute_public_key()
            .map_err(|_| Error::General("X25519: cannot compute the public key".into()))?;
        Ok(Box::new(KeyShare { private, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// One side's ephemeral key, until the peer's share arrives.
struct KeyShare {
    private: agreement::EphemeralPrivateKey,
    public: agreement::PublicKey,
}

impl ActiveKeyExchange for KeyShare {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        // A share of the wrong length, or one of low order (an all-zero secret), is
        // refused by aws-lc-rs; both are the peer's fault.
        if peer.len() != 32 {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        let peer = agreement::UnparsedPublicKey::new(&agreement::X25519, peer);
        agreement::agree_ephemeral(
            self.private,
            peer,
            Error::from(PeerMisbehaved::InvalidKeyShare),
            |secret| Ok(SharedSecret::from(secret)),
        )
    }

    fn pub_key(&self) -> &[u8] {
        self.public.as_ref()
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our share and *ring*'s agree on one secret: the exchange is X25519 as *ring*
    /// computes it, not merely symmetric.
    #[test]
    fn both_sides_agree_and_ring_agrees_with_them() {
        let ours = X25519.start().unwrap();
        let ring_side = rustls::crypto::ring::kx_group::X25519.start().unwrap();
        let ours_public = ours.pub_key().to_vec();
        let ring_public = ring_side.pub_key().to_vec();
        assert_eq!(ours_public.len(), 32);
        let ours_secret = ours.complete(&ring_public).unwrap();
        let ring_secret = ring_side.complete(&ours_public).unwrap();
        assert_eq!(ours_secret.secret_bytes(), ring_secret.secret_bytes());
        assert_ne!(ours_secret.secret_bytes(), &[0u8; 32]);
    }

    /// A share that is not a point of the right size, or of low order, is the peer's
    /// error, not a panic.
    #[test]
    fn bad_shares_are_refused() {
        for bad in [&[9u8; 31][..], &[0u8; 32][..], &[1u8; 33][..]] {
            let ours = X25519.start().unwrap();
            assert_eq!(
                ours.complete(bad).err(),
                Some(Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)),
                "{} bytes",
                bad.len()
            );
        }
    }
}
