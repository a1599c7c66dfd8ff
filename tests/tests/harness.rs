//! Unit tests of the harness's own helpers (the library has no test
//! target: a test build of it would compile its swarm simulator again,
//! about a minute of CI, for these few checks).

use nakshatra_e2e::bench::{read_traces, HopBreakdown};
use nakshatra_e2e::webdriver::{base64_decode, dechunk};

#[test]
fn base64_round_trips_known_values() {
    assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
    assert_eq!(base64_decode("aGVsbG8h").as_deref(), Some(&b"hello!"[..]));
    assert_eq!(base64_decode("aA==").as_deref(), Some(&b"h"[..]));
    assert_eq!(
        base64_decode("iVBORw0KGgo=").as_deref(),
        Some(&b"\x89PNG\r\n\x1a\n"[..])
    );
    assert_eq!(base64_decode("a*b"), None);
}

#[test]
fn dechunks() {
    let body = b"4\r\nWiki\r\n6;x=y\r\npedia \r\n0\r\n\r\n";
    assert_eq!(dechunk(body).as_deref(), Some(&b"Wikipedia "[..]));
    assert_eq!(dechunk(b"5\r\nab"), None);
}

#[test]
fn a_traced_step_splits_into_its_stages() {
    let dir = tempfile::tempdir().unwrap();
    let hop = dir.path().join("hop.tsv");
    let ask = dir.path().join("ask.tsv");
    std::fs::write(
        &hop,
        "# header\nhop\t7\t1\t1\t0\t110\t111\t113\t213\t215\t216\t220\nhop\t7\t1\t1\t1\t250\t251\t253\t353\t355\t356\t360\nhop\t7\t2\t1",
    )
    .unwrap();
    std::fs::write(&ask, "ask\t7\t1\t1\t100\t105\t400\n").unwrap();
    let lines = read_traces(&[hop, ask]);
    assert_eq!(lines.len(), 3, "the line cut short is skipped");
    let b = HopBreakdown::of(&lines, 2);
    let got: Vec<(String, f64)> = b.stages.iter().map(|(n, v)| (n.clone(), v[0])).collect();
    assert_eq!(got[0], ("asker: encode + write".into(), 5.0));
    assert_eq!(got[1], ("link asker → hop 0".into(), 5.0));
    assert_eq!(got[4], ("hop 0: compute".into(), 100.0));
    assert_eq!(got[8], ("link hop 0 → hop 1".into(), 30.0));
    assert_eq!(got.last().unwrap(), &("link hop 1 → asker".into(), 40.0));
    assert_eq!(b.steps, vec![(300.0, 200.0)]);
    assert_eq!(b.overheads(), vec![50.0]);
}

#[test]
fn a_ringing_step_runs_from_hop_0_to_hop_0() {
    let dir = tempfile::tempdir().unwrap();
    let hop = dir.path().join("hop.tsv");
    // Step 1 through two hops (the last hop samples and feeds hop 0 by
    // 225, writes the token to the asker by 240), then step 2 read by hop
    // 0 at 300; step 2 has no next step, so it is not counted.
    std::fs::write(
        &hop,
        "hop\t7\t1\t1\t0\t110\t111\t113\t213\t215\t216\t220\n\
         hop\t7\t1\t1\t1\t250\t251\t253\t353\t355\t365\t380\n\
         hop\t7\t2\t1\t0\t400\t401\t403\t503\t505\t506\t510\n",
    )
    .unwrap();
    let ask = dir.path().join("ask.tsv");
    std::fs::write(&ask, "ask\t7\t0\t5\t10\t11\t100\n").unwrap();
    let other = dir.path().join("other.tsv");
    // Another session's steps (another ask) are not counted.
    std::fs::write(
        &other,
        "hop\t8\t1\t1\t0\t110\t111\t113\t213\t215\t216\t220\n\
         hop\t8\t1\t1\t1\t250\t251\t253\t353\t355\t365\t380\n\
         hop\t8\t2\t1\t0\t900\t901\t903\t1003\t1005\t1006\t1010\n",
    )
    .unwrap();
    let b = HopBreakdown::of_ring(&read_traces(&[hop, ask, other]), 2);
    let got: Vec<(String, f64)> = b.stages.iter().map(|(n, v)| (n.clone(), v[0])).collect();
    assert_eq!(got[2], ("hop 0: compute".into(), 100.0));
    assert_eq!(got[6], ("link hop 0 → hop 1".into(), 30.0));
    assert_eq!(got[11], ("hop 1: sample + write to hop 0".into(), 10.0));
    assert_eq!(
        got[12],
        ("hop 1: write to the asker (off path)".into(), 15.0)
    );
    assert_eq!(
        got.last().unwrap(),
        &("link hop 1 → hop 0 (ring)".into(), 35.0)
    );
    assert_eq!(b.steps, vec![(290.0, 200.0)]);
    assert_eq!(b.overheads(), vec![45.0]);
}
