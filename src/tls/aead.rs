//! TLS 1.3's AES-GCM records sealed and opened by aws-lc-rs, on CPUs where its AES-GCM
//! is the faster one.
//!
//! aws-lc's AES-GCM has a path for CPUs with AVX-512 and the vector AES and carry-less
//! multiply instructions (AVX512F/DQ/BW/VL, VAES, VPCLMULQDQ: AMD Zen 4 and later,
//! Intel Ice Lake and later); *ring*'s widest path uses 256-bit registers. On an AMD
//! EPYC with those instructions, aws-lc-rs sealed 16 KiB records at ~23 GB/s and opened
//! them at ~18 GB/s where *ring* did ~11 and ~10; on an earlier machine of the same kind
//! (whose CPU flags were not written down) aws-lc-rs sealed at ~3.7 GB/s and *ring* at
//! ~7, as aws-lc's path for CPUs without AVX-512 would (ARCHITECTURE.md). So the
//! choice is made per CPU, as aws-lc makes its own ([`wide_aes_gcm`] asks for what aws-lc
//! asks for), and everything else in the suite (the hash, HKDF) stays *ring*'s.
//!
//! Records are every byte TLS fan-out sends: each subscriber's copy of each event is
//! sealed by the hub and opened by the subscriber.

use std::sync::LazyLock;

use aws_lc_rs::aead;
use rustls::crypto::cipher::{
    make_tls13_aad, AeadKey, InboundOpaqueMessage, InboundPlainMessage, Iv, MessageDecrypter,
    MessageEncrypter, Nonce, OutboundOpaqueMessage, OutboundPlainMessage, PrefixedPayload,
    Tls13AeadAlgorithm, UnsupportedOperationError,
};
use rustls::{
    CipherSuite, ConnectionTrafficSecrets, ContentType, Error, ProtocolVersion,
    SupportedCipherSuite, Tls13CipherSuite,
};

/// Whether this CPU has what aws-lc's widest AES-GCM needs (its
/// `crypto_gcm_avx512_enabled`); on others *ring*'s is the faster.
pub(super) fn wide_aes_gcm() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `suite` (one of *ring*'s TLS 1.3 AES-GCM suites) with its records sealed and opened
/// by aws-lc-rs; `None` for any other suite.
pub(super) fn with_aws_lc_records(suite: SupportedCipherSuite) -> Option<SupportedCipherSuite> {
    static AES_128: LazyLock<Option<Tls13CipherSuite>> = LazyLock::new(|| {
        swap_records(
            rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            &AES_128_GCM,
        )
    });
    static AES_256: LazyLock<Option<Tls13CipherSuite>> = LazyLock::new(|| {
        swap_records(
            rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
            &AES_256_GCM,
        )
    });
    let swapped = match suite.suite() {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => AES_128.as_ref(),
        CipherSuite::TLS13_AES_256_GCM_SHA384 => AES_256.as_ref(),
        _ => None,
    }?;
    Some(SupportedCipherSuite::Tls13(swapped))
}

fn swap_records(
    suite: SupportedCipherSuite,
    records: &'static AwsLcGcm,
) -> Option<Tls13CipherSuite> {
    let SupportedCipherSuite::Tls13(ring) = suite else {
        return None;
    };
    Some(Tls13CipherSuite {
        common: rustls::CipherSuiteCommon {
            suite: ring.common.suite,
            hash_provider: ring.common.hash_provider,
            confidentiality_limit: ring.common.confidentiality_limit,
        },
        hkdf_provider: ring.hkdf_provider,
        aead_alg: records,
        quic: ring.quic,
    })
}

static AES_128_GCM: AwsLcGcm = AwsLcGcm {
    algorithm: &aead::AES_128_GCM,
    secrets: |key, iv| ConnectionTrafficSecrets::Aes128Gcm { key, iv },
};
static AES_256_GCM: AwsLcGcm = AwsLcGcm {
    algorithm: &aead::AES_256_GCM,
    secrets: |key, iv| ConnectionTrafficSecrets::Aes256Gcm { key, iv },
};

/// One AES-GCM key size, as rustls's TLS 1.3 record layer asks for it.
struct AwsLcGcm {
    algorithm: &'static aead::Algorithm,
    /// The keys in the form kernel TLS (or anyone extracting them) is handed.
    secrets: fn(AeadKey, Iv) -> ConnectionTrafficSecrets,
}

impl AwsLcGcm {
    fn key(&self, key: &AeadKey) -> aead::LessSafeKey {
        // rustls derives `key` at `key_len()` bytes, which is all aws-lc-rs checks.
        let key = aead::UnboundKey::new(self.algorithm, key.as_ref())
            .expect("rustls hands over a key of the suite's length");
        aead::LessSafeKey::new(key)
    }
}

impl Tls13AeadAlgorithm for AwsLcGcm {
    fn encrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageEncrypter> {
        Box::new(Sealer {
            key: self.key(&key),
            iv,
        })
    }

    fn decrypter(&self, key: AeadKey, iv: Iv) -> Box<dyn MessageDecrypter> {
        Box::new(Opener {
            key: self.key(&key),
            iv,
        })
    }

    fn key_len(&self) -> usize {
        self.algorithm.key_len()
    }

    fn extract_keys(
        &self,
        key: AeadKey,
        iv: Iv,
    ) -> Result<ConnectionTrafficSecrets, UnsupportedOperationError> {
        Ok((self.secrets)(key, iv))
    }

    fn fips(&self) -> bool {
        false
    }
}

/// Seals one direction's records (RFC 8446 §5.2: the per-record nonce is the
/// sequence number XORed into the IV; the additional data is the record's header).
struct Sealer {
    key: aead::LessSafeKey,
    iv: Iv,
}

impl MessageEncrypter for Sealer {
    fn encrypt(
        &mut self,
        msg: OutboundPlainMessage<'_>,
        seq: u64,
    ) -> Result<OutboundOpaqueMessage, Error> {
        let total = self.encrypted_payload_len(msg.payload.len());
        let mut payload = PrefixedPayload::with_capacity(total);
        payload.extend_from_chunks(&msg.payload);
        // TLSInnerPlaintext: the content, then its real type.
        payload.extend_from_slice(&[u8::from(msg.typ)]);
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        self.key
            .seal_in_place_append_tag(nonce, aead::Aad::from(make_tls13_aad(total)), &mut payload)
            .map_err(|_| Error::EncryptError)?;
        // Every TLS 1.3 record goes out as application data, version 1.2 (RFC 8446 §5.1).
        Ok(OutboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            payload,
        ))
    }

    fn encrypted_payload_len(&self, payload_len: usize) -> usize {
        payload_len + 1 + self.key.algorithm().tag_len()
    }
}

/// Opens one direction's records.
struct Opener {
    key: aead::LessSafeKey,
    iv: Iv,
}

impl MessageDecrypter for Opener {
    fn decrypt<'a>(
        &mut self,
        mut msg: InboundOpaqueMessage<'a>,
        seq: u64,
    ) -> Result<InboundPlainMessage<'a>, Error> {
        let payload = &mut msg.payload;
        if payload.len() < self.key.algorithm().tag_len() {
            return Err(Error::DecryptError);
        }
        let nonce = aead::Nonce::assume_unique_for_key(Nonce::new(&self.iv, seq).0);
        let aad = aead::Aad::from(make_tls13_aad(payload.len()));
        let plain = self
            .key
            .open_in_place(nonce, aad, payload)
            .map_err(|_| Error::DecryptError)?
            .len();
        payload.truncate(plain);
        msg.into_tls13_unpadded_message()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// *ring*'s record layer for `suite`, which ours must match byte for byte.
    fn ring_records(suite: CipherSuite) -> &'static dyn Tls13AeadAlgorithm {
        rustls::crypto::ring::default_provider()
            .cipher_suites
            .into_iter()
            .find_map(|s| match s {
                SupportedCipherSuite::Tls13(s) if s.common.suite == suite => Some(s.aead_alg),
                _ => None,
            })
            .expect("ring has the suite")
    }

    fn seal(with: &dyn Tls13AeadAlgorithm, plain: &[u8], seq: u64) -> Vec<u8> {
        let mut sealer = with.encrypter(AeadKey::from([7; 32]), Iv::new([9; 12]));
        let message = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: plain.into(),
        };
        sealer.encrypt(message, seq).expect("sealed").encode()
    }

    fn open(with: &dyn Tls13AeadAlgorithm, record: &mut [u8], seq: u64) -> Result<Vec<u8>, Error> {
        let mut opener = with.decrypter(AeadKey::from([7; 32]), Iv::new([9; 12]));
        let message = InboundOpaqueMessage::new(
            ContentType::ApplicationData,
            ProtocolVersion::TLSv1_2,
            &mut record[5..],
        );
        let plain = opener.decrypt(message, seq)?;
        assert_eq!(plain.typ, ContentType::ApplicationData);
        Ok(plain.payload.to_vec())
    }

    // AES-256's key is the 32 bytes rustls's public `AeadKey` holds; AES-128's is
    // checked end to end, through handshakes, in `tls::tests`.
    #[test]
    fn aes_256_records_match_ring_s_both_ways() {
        let ring = ring_records(CipherSuite::TLS13_AES_256_GCM_SHA384);
        for len in [0, 1, 150, 2048, 16_384] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            for seq in [0, 1, u64::MAX - 1] {
                let ours = seal(&AES_256_GCM, &plain, seq);
                assert_eq!(ours, seal(ring, &plain, seq), "{len} bytes, record {seq}");
                assert_eq!(open(ring, &mut ours.clone(), seq).unwrap(), plain);
                assert_eq!(open(&AES_256_GCM, &mut ours.clone(), seq).unwrap(), plain);
            }
        }
    }

    #[test]
    fn damaged_short_or_misnumbered_records_are_refused() {
        let record = seal(&AES_256_GCM, b"{\"event\":\"pickup\"}", 3);
        let mut flipped = record.clone();
        flipped[9] ^= 1;
        assert!(matches!(
            open(&AES_256_GCM, &mut flipped, 3),
            Err(Error::DecryptError)
        ));
        assert!(matches!(
            open(&AES_256_GCM, &mut record.clone(), 4),
            Err(Error::DecryptError)
        ));
        let mut short = record[..5 + 15].to_vec();
        assert!(matches!(
            open(&AES_256_GCM, &mut short, 3),
            Err(Error::DecryptError)
        ));
    }
}
