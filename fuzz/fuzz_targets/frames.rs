//! Fuzz target `frames`: the binary frames between agent and relay (batch, ack, outcome,
//! refusal and refusal-ack frames, version byte and postcard) and the sealed (HMAC-signed)
//! frame around them, on arbitrary bytes as a broker delivers them.
//!
//! Asserts: no panic; a frame over the size limit is refused before it is read; whatever
//! decodes encodes and decodes back to itself; a decoded batch is consistent (site id, a
//! non-empty run of strictly increasing sequence numbers after `acked_through`); unsigned,
//! truncated and forged sealed frames are told apart, and only what the key sealed opens; a
//! frame sealed with a site's key opens with that key (alone or beside a second one while
//! rotating) and with no other site's key, to exactly the bytes sealed.

#![no_main]

use backhaul_events::signing::{SealError, SiteKeys, is_sealed};
use backhaul_events::topics::check_site_id;
use backhaul_events::{
    AckFrame, BatchFrame, FrameError, OutcomeFrame, RefusalAckFrame, RefusalFrame, TallyFrame,
};
use libfuzzer_sys::fuzz_target;

/// The size limit the fuzz target decodes under; inputs longer than it check the refusal.
const MAX_FRAME: usize = 64 * 1024;
const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

macro_rules! round_trip {
    ($frame:ty, $data:expr) => {{
        let decoded = <$frame>::decode($data, MAX_FRAME);
        if $data.len() > MAX_FRAME {
            assert!(matches!(decoded, Err(FrameError::TooLarge { .. })));
        }
        if let Ok(frame) = &decoded {
            let bytes = frame.encode().expect("a decoded frame encodes");
            let again = <$frame>::decode(&bytes, usize::MAX).expect("its encoding decodes");
            assert_eq!(&again, frame);
        }
        decoded
    }};
}

fn check_batch(batch: &BatchFrame) {
    assert!(check_site_id(&batch.site).is_ok());
    assert!(batch.acked_through < batch.first_seq);
    assert!(batch.first_seq <= batch.last_seq);
    assert_eq!(batch.events.first().map(|e| e.seq), Some(batch.first_seq));
    assert_eq!(batch.events.last().map(|e| e.seq), Some(batch.last_seq));
    assert!(batch.events.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(batch.stamped().count(), batch.events.len());
}

/// Every decoder on the same bytes, as a relay or agent meets them on its topics.
fn decode_all(data: &[u8]) -> Vec<Result<(), FrameError>> {
    let batch = round_trip!(BatchFrame, data);
    if let Ok(batch) = &batch {
        check_batch(batch);
    }
    let ack = round_trip!(AckFrame, data);
    if let Ok(ack) = &ack {
        assert!(check_site_id(&ack.site).is_ok());
    }
    vec![
        batch.map(drop),
        ack.map(drop),
        round_trip!(OutcomeFrame, data).map(drop),
        round_trip!(RefusalFrame, data).map(drop),
        round_trip!(RefusalAckFrame, data).map(drop),
        round_trip!(TallyFrame, data).map(drop),
    ]
}

fuzz_target!(|data: &[u8]| {
    let plain = decode_all(data);

    let keys = SiteKeys::from_hex(&[KEY]).expect("a valid key");
    let rotating = SiteKeys::from_hex(&[OTHER_KEY, KEY]).expect("valid keys");
    let other = SiteKeys::from_hex(&[OTHER_KEY]).expect("a valid key");

    // Bytes from the broker, opened as a sealed frame: only what the key sealed opens.
    match keys.open(data) {
        Ok(inner) => assert_eq!(keys.seal(inner), data, "opened what the key did not seal"),
        Err(error) => {
            let expected = if !is_sealed(data) {
                SealError::Unsigned
            } else if data.len() < 33 {
                SealError::Truncated
            } else {
                SealError::BadSignature
            };
            assert_eq!(error, expected);
        }
    }

    // The same bytes sealed by the site: they open to exactly themselves and decode alike.
    let sealed = keys.seal(data);
    assert!(is_sealed(&sealed));
    assert_eq!(keys.open(&sealed), Ok(data));
    assert_eq!(rotating.open(&sealed), Ok(data));
    assert_eq!(other.open(&sealed), Err(SealError::BadSignature));
    if let Some((last, rest)) = sealed.split_last() {
        let mut tampered = rest.to_vec();
        tampered.push(last ^ 0x01);
        assert!(keys.open(&tampered).is_err());
        assert!(keys.open(rest).is_err());
    }
    if let Ok(inner) = keys.open(&sealed) {
        assert_eq!(decode_all(inner), plain);
    }
});
