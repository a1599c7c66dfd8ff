//! Signing and verifying `ServerInfo` records: everything a hostile or
//! broken peer can send must be refused with the right reason, and nothing
//! may panic.

use ed25519_dalek::SigningKey;
use nakshatra_protocol::{
    peer_id_of, sign, verify, DeviceInfo, NextRtt, PeerId, RecordError, ServerInfo, ServerState,
    SignedServerInfo, MAX_CLOCK_SKEW_MS, MAX_MODEL_NAME_LEN, MAX_NEXT_RTTS, MAX_RECORD_BYTES,
    MAX_RECORD_LIFETIME_MS, PROTOCOL_VERSION,
};

const NOW: u64 = 1_750_000_000_000;

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

fn peer(key: &SigningKey) -> PeerId {
    peer_id_of(&key.verifying_key().to_bytes()).unwrap()
}

fn info() -> ServerInfo {
    let mut i = ServerInfo::new("a1".repeat(32), "llama", 30, 6..12, 2048);
    i.devices = vec![DeviceInfo {
        name: "CPU".into(),
        backend: "CPU".into(),
        description: "AMD EPYC".into(),
        memory_total: 64 << 30,
        memory_free: 32 << 30,
        features: vec!["AVX2".into()],
    }];
    i.throughput = 123.5;
    i.free_sessions = 3;
    i.max_sessions = 4;
    i.context_per_session = 4096;
    i.listen_addrs = vec!["/ip4/127.0.0.1/tcp/4001".into()];
    i.model_name = "smollm2:135m-q4_1".into();
    i.issued_at_ms = NOW;
    i.expires_at_ms = NOW + 90_000;
    i
}

/// Tiny deterministic PRNG (xorshift64*), so the fuzz loops need no crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn round_trip() {
    let k = key(1);
    let signed = sign(&k, &info()).unwrap();
    assert_eq!(signed.peer_id().unwrap(), peer(&k));
    let bytes = signed.to_bytes();
    let v = verify(&bytes, Some(&peer(&k)), NOW + 1).unwrap();
    assert_eq!(v.info, info());
    assert_eq!(v.peer_id, peer(&k));
    // Without an expected peer the signer is reported.
    assert_eq!(verify(&bytes, None, NOW).unwrap().peer_id, peer(&k));
    assert_eq!(v.info.backend_summary(), "CPU");
    assert!(v.info.holds(6) && v.info.holds(11) && !v.info.holds(12));
}

#[test]
fn peer_id_matches_libp2p() {
    // The PeerId we derive equals libp2p's for the same secret.
    let k = key(9);
    let mut secret = k.to_bytes();
    let kp = libp2p_identity::Keypair::ed25519_from_bytes(&mut secret).unwrap();
    assert_eq!(peer(&k), kp.public().to_peer_id());
    assert_eq!(PeerId::from_public_key(&kp.public()), peer(&k));
}

#[test]
fn signed_by_another_key_is_refused() {
    // Signed by B, stored under (or received from) A.
    let a = key(1);
    let b = key(2);
    let bytes = sign(&b, &info()).unwrap().to_bytes();
    match verify(&bytes, Some(&peer(&a)), NOW) {
        Err(RecordError::PeerMismatch { expected, signer }) => {
            assert_eq!(*expected, peer(&a));
            assert_eq!(*signer, peer(&b));
        }
        other => panic!("{other:?}"),
    }
    // B's key but A's public key swapped in: the signature no longer holds.
    let mut signed = sign(&b, &info()).unwrap();
    signed.public_key = a.verifying_key().to_bytes();
    assert_eq!(
        verify(&signed.to_bytes(), Some(&peer(&a)), NOW),
        Err(RecordError::BadSignature)
    );
}

#[test]
fn tampered_payload_is_refused() {
    let k = key(1);
    let signed = sign(&k, &info()).unwrap();
    for i in 0..signed.payload.len() {
        let mut t = signed.clone();
        t.payload[i] ^= 0x01;
        let r = verify(&t.to_bytes(), Some(&peer(&k)), NOW);
        assert_eq!(r, Err(RecordError::BadSignature), "payload byte {i}");
    }
    // And every bit of the encoded record: refused, whatever the reason.
    let bytes = signed.to_bytes();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut t = bytes.clone();
            t[i] ^= 1 << bit;
            assert!(
                verify(&t, Some(&peer(&k)), NOW).is_err(),
                "byte {i} bit {bit}"
            );
        }
    }
    // Tampered signature.
    let mut t = signed.clone();
    t.signature[5] ^= 0x80;
    assert!(verify(&t.to_bytes(), Some(&peer(&k)), NOW).is_err());
}

#[test]
fn expired_is_refused() {
    let k = key(1);
    let bytes = sign(&k, &info()).unwrap().to_bytes();
    let exp = info().expires_at_ms;
    assert!(verify(&bytes, None, exp - 1).is_ok());
    assert_eq!(
        verify(&bytes, None, exp),
        Err(RecordError::Expired {
            expires_at_ms: exp,
            now_ms: exp
        })
    );
    assert!(matches!(
        verify(&bytes, None, exp + 1_000_000),
        Err(RecordError::Expired { .. })
    ));
}

#[test]
fn issued_in_the_future_is_refused() {
    let k = key(1);
    let mut i = info();
    i.issued_at_ms = NOW + MAX_CLOCK_SKEW_MS + 1;
    i.expires_at_ms = i.issued_at_ms + 90_000;
    let bytes = sign(&k, &i).unwrap().to_bytes();
    assert!(matches!(
        verify(&bytes, None, NOW),
        Err(RecordError::FromFuture { .. })
    ));
    // Within the skew is fine.
    i.issued_at_ms = NOW + MAX_CLOCK_SKEW_MS;
    i.expires_at_ms = i.issued_at_ms + 90_000;
    assert!(verify(&sign(&k, &i).unwrap().to_bytes(), None, NOW).is_ok());
}

#[test]
fn overlong_lifetime_is_refused() {
    let k = key(1);
    let mut i = info();
    i.expires_at_ms = i.issued_at_ms + MAX_RECORD_LIFETIME_MS + 1;
    let bytes = sign(&k, &i).unwrap().to_bytes();
    assert!(matches!(
        verify(&bytes, None, NOW),
        Err(RecordError::TooLong { .. })
    ));
    // expires before issued: sign refuses, a hand-made one is refused too.
    i.expires_at_ms = i.issued_at_ms - 1;
    assert!(sign(&k, &i).is_err());
    let raw = SignedServerInfo::sign_raw(
        &k,
        PROTOCOL_VERSION,
        nakshatra_protocol::encode(&i).unwrap(),
    );
    assert!(matches!(
        verify(&raw.to_bytes(), None, NOW - 10),
        Err(RecordError::TooLong { lifetime_ms: 0, .. })
    ));
}

#[test]
fn wrong_protocol_version_is_refused() {
    let k = key(1);
    let mut i = info();
    i.protocol_version = PROTOCOL_VERSION + 1;
    let bytes = sign(&k, &i).unwrap().to_bytes();
    assert_eq!(
        verify(&bytes, None, NOW),
        Err(RecordError::WrongVersion {
            found: PROTOCOL_VERSION + 1,
            expected: PROTOCOL_VERSION
        })
    );
    // Outer version says 1, payload says 2: still refused.
    let raw = SignedServerInfo::sign_raw(
        &k,
        PROTOCOL_VERSION,
        nakshatra_protocol::encode(&i).unwrap(),
    );
    assert!(matches!(
        verify(&raw.to_bytes(), None, NOW),
        Err(RecordError::WrongVersion { .. })
    ));
    // A future envelope that does not even decode: malformed, with the
    // version it leads with in the message.
    let mut future = nakshatra_protocol::encode(&(PROTOCOL_VERSION + 1)).unwrap();
    future.extend_from_slice(b"something else entirely");
    match verify(&future, None, NOW) {
        Err(RecordError::Malformed(why)) => assert!(
            why.contains(&format!("version field reads {}", PROTOCOL_VERSION + 1)),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
}

#[test]
fn oversized_is_refused() {
    let k = key(1);
    // Too big to sign.
    let mut i = info();
    i.listen_addrs = vec!["/ip4/1.2.3.4/tcp/1".into(); 30];
    i.devices = vec![
        DeviceInfo {
            name: "x".repeat(128),
            backend: "y".repeat(32),
            description: "z".repeat(256),
            memory_total: 1,
            memory_free: 1,
            features: vec![],
        };
        16
    ];
    i.next_rtts = (0..MAX_NEXT_RTTS as u8)
        .map(|n| NextRtt {
            peer_id: peer(&key(100 + n)).to_base58(),
            rtt_ms: 1234.5,
        })
        .collect();
    i.model_name = format!("{}:{}", "b".repeat(63), "t".repeat(64));
    assert_eq!(i.model_name.len(), MAX_MODEL_NAME_LEN);
    assert!(sign(&k, &i).is_ok(), "the largest valid record fits");
    // A hand-made record over the limit (validly signed).
    let payload = vec![0u8; MAX_RECORD_BYTES];
    let raw = SignedServerInfo::sign_raw(&k, PROTOCOL_VERSION, payload).to_bytes();
    assert!(raw.len() > MAX_RECORD_BYTES);
    assert!(matches!(
        verify(&raw, None, NOW),
        Err(RecordError::TooLarge { .. })
    ));
    // Plain big garbage.
    assert!(matches!(
        verify(&vec![7u8; 1 << 20], None, NOW),
        Err(RecordError::TooLarge { .. })
    ));
}

#[test]
fn bad_fields_are_refused_even_when_signed() {
    let k = key(1);
    type Check = fn(&RecordError) -> bool;
    let cases: Vec<(ServerInfo, Check)> = vec![
        (
            ServerInfo {
                model_id: "A1".repeat(32),
                ..info()
            },
            |e| matches!(e, RecordError::BadModelId(_)),
        ),
        (
            ServerInfo {
                model_id: "a1".repeat(31),
                ..info()
            },
            |e| matches!(e, RecordError::BadModelId(_)),
        ),
        (
            ServerInfo {
                start: 12,
                end: 12,
                ..info()
            },
            |e| matches!(e, RecordError::BadRange { .. }),
        ),
        (ServerInfo { end: 31, ..info() }, |e| {
            matches!(e, RecordError::BadRange { .. })
        }),
        (
            ServerInfo {
                throughput: f64::NAN,
                ..info()
            },
            |e| matches!(e, RecordError::BadField { .. }),
        ),
        // A device listing more features than any CPU has, or one with a
        // control character.
        (
            {
                let mut i = info();
                i.devices[0].features = vec!["AVX".into(); 65];
                i
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "devices.features",
                        ..
                    }
                )
            },
        ),
        (
            {
                let mut i = info();
                i.devices[0].features = vec!["AVX\n2".into()];
                i
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "devices.features",
                        ..
                    }
                )
            },
        ),
        // A model name with spaces, capitals, two colons or over the limit.
        (
            ServerInfo {
                model_name: "SmolLM2 135M".into(),
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "model_name",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                model_name: "a:b:c".into(),
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "model_name",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                model_name: "a".repeat(MAX_MODEL_NAME_LEN + 1),
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "model_name",
                        ..
                    }
                )
            },
        ),
        // Impossible announcements: a rate no hardware reaches, a context
        // or session count beyond any model or machine.
        (
            ServerInfo {
                throughput: 1e9,
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "throughput",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                context_per_session: u32::MAX,
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "context_per_session",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                max_sessions: u32::MAX,
                free_sessions: 1,
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "max_sessions",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                arch: "llama\x1b[2J".into(),
                ..info()
            },
            |e| matches!(e, RecordError::BadField { .. }),
        ),
        (
            ServerInfo {
                free_sessions: 5,
                max_sessions: 4,
                ..info()
            },
            |e| matches!(e, RecordError::BadField { .. }),
        ),
        (
            ServerInfo {
                next_rtts: vec![next_rtt(2, 1.0); MAX_NEXT_RTTS + 1],
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "next_rtts",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                next_rtts: vec![next_rtt(2, f32::NAN)],
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "next_rtts.rtt_ms",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                next_rtts: vec![next_rtt(2, f32::INFINITY)],
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "next_rtts.rtt_ms",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                next_rtts: vec![next_rtt(2, -0.5)],
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "next_rtts.rtt_ms",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                next_rtts: vec![NextRtt {
                    peer_id: "not-a-peer".into(),
                    rtt_ms: 1.0,
                }],
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "next_rtts.peer_id",
                        ..
                    }
                )
            },
        ),
        (
            ServerInfo {
                next_rtts: vec![NextRtt {
                    peer_id: "1".repeat(5000),
                    rtt_ms: 1.0,
                }],
                ..info()
            },
            |e| {
                matches!(
                    e,
                    RecordError::BadField {
                        field: "next_rtts.peer_id",
                        ..
                    }
                )
            },
        ),
    ];
    for (i, is_expected) in cases {
        let err = sign(&k, &i).unwrap_err();
        assert!(is_expected(&err), "sign: {err:?}");
        let raw = SignedServerInfo::sign_raw(
            &k,
            PROTOCOL_VERSION,
            nakshatra_protocol::encode(&i).unwrap(),
        );
        let err = verify(&raw.to_bytes(), None, NOW).unwrap_err();
        assert!(is_expected(&err), "verify: {err:?}");
    }
}

#[test]
fn malformed_bytes_are_refused_without_panic() {
    let k = key(1);
    let good = sign(&k, &info()).unwrap().to_bytes();
    assert!(matches!(
        verify(&[], None, NOW),
        Err(RecordError::Malformed(_))
    ));
    // Every truncation.
    for n in 0..good.len() {
        assert!(verify(&good[..n], None, NOW).is_err(), "truncated to {n}");
    }
    // Trailing garbage.
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        verify(&long, None, NOW),
        Err(RecordError::Malformed(_))
    ));
    // Random bytes of every small length, and random splices into a good
    // record.
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let n = (rng.next() % 300) as usize;
        let bytes = rng.bytes(n);
        assert!(verify(&bytes, None, NOW).is_err());
    }
    for _ in 0..5_000 {
        let mut t = good.clone();
        let at = (rng.next() as usize) % t.len();
        let n = 1 + (rng.next() % 8) as usize;
        for j in at..(at + n).min(t.len()) {
            t[j] = rng.next() as u8;
        }
        let _ = verify(&t, None, NOW);
    }
    // A valid envelope whose payload is garbage, and one whose key is not a
    // curve point.
    let raw = SignedServerInfo::sign_raw(&k, PROTOCOL_VERSION, vec![0xff; 40]);
    assert!(matches!(
        verify(&raw.to_bytes(), None, NOW),
        Err(RecordError::Malformed(_))
    ));
    let mut bad_key = sign(&k, &info()).unwrap();
    bad_key.public_key = [0xff; 32];
    assert!(verify(&bad_key.to_bytes(), None, NOW).is_err());
}

fn next_rtt(seed: u8, rtt_ms: f32) -> NextRtt {
    NextRtt {
        peer_id: peer(&key(seed)).to_base58(),
        rtt_ms,
    }
}

#[test]
fn next_rtts_round_trip() {
    let k = key(5);
    let mut i = info();
    i.next_rtts = vec![next_rtt(6, 0.0), next_rtt(7, 12.25)];
    let v = verify(&sign(&k, &i).unwrap().to_bytes(), Some(&peer(&k)), NOW).unwrap();
    assert_eq!(v.info.next_rtts, i.next_rtts);
    assert_eq!(v.info.next_rtts[1].peer(), Some(peer(&key(7))));
    i.next_rtts = vec![next_rtt(6, 1.0); MAX_NEXT_RTTS];
    assert!(sign(&k, &i).is_ok());
}

#[test]
fn tombstone_round_trips() {
    let k = key(4);
    let mut i = info();
    i.state = ServerState::Offline;
    let v = verify(&sign(&k, &i).unwrap().to_bytes(), None, NOW).unwrap();
    assert_eq!(v.info.state, ServerState::Offline);
}
