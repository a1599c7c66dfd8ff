//! Bad input to the engine is a clear error that loses nothing: the session
//! is as it was and keeps working.

mod common;

use common::*;
use nakshatra_node::engine::{EngineError, SessionId, SliceEngine, StepInput, StepOutput};

#[test]
fn bad_steps_are_refused_and_sessions_survive() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let paths = slices(dir.path(), &[10, 20]);
    let c = cfg(2, 512);
    let mut first = SliceEngine::load(&paths[0], None, &c).unwrap();
    let mut mid = SliceEngine::load(&paths[1], None, &c).unwrap();
    let mut last = SliceEngine::load(&paths[2], None, &c).unwrap();
    assert!(first.layout().is_first() && !first.layout().is_last());
    assert!(last.layout().is_last());
    assert_eq!(mid.layout().start, 10);

    let s = first.open_session().unwrap();
    let m = mid.open_session().unwrap();
    // Tokens to a middle range, hidden states to the first.
    assert!(matches!(
        mid.forward(m, StepInput::Tokens(&[1, 2])),
        Err(EngineError::BadInput(_))
    ));
    assert!(matches!(
        first.forward(s, StepInput::Hidden(&[0.0; 576])),
        Err(EngineError::BadInput(_))
    ));
    // Ragged rows, non-finite values, empty steps, out-of-vocab tokens.
    assert!(matches!(
        mid.forward(m, StepInput::Hidden(&[0.0; 577])),
        Err(EngineError::BadInput(_))
    ));
    let mut nan = vec![0.0f32; 576];
    nan[3] = f32::NAN;
    assert!(matches!(
        mid.forward(m, StepInput::Hidden(&nan)),
        Err(EngineError::BadInput(_))
    ));
    assert!(matches!(
        mid.forward(m, StepInput::Hidden(&[])),
        Err(EngineError::BadInput(_))
    ));
    let e = first
        .forward(s, StepInput::Tokens(&[1, 49152]))
        .unwrap_err();
    assert!(e.to_string().contains("49152"), "{e}");
    assert!(first.forward(s, StepInput::Tokens(&[-1])).is_err());
    // Unknown sessions.
    assert!(matches!(
        first.forward(SessionId(999), StepInput::Tokens(&[1])),
        Err(EngineError::UnknownSession(999))
    ));
    // None of that moved the sessions.
    assert_eq!(first.position(s).unwrap(), 0);
    assert_eq!(mid.position(m).unwrap(), 0);

    // A step that does not fit in the context.
    let long = vec![1i32; 513];
    let e = first.forward(s, StepInput::Tokens(&long)).unwrap_err();
    assert!(
        matches!(e, EngineError::ContextFull { limit: 512, .. }),
        "{e}"
    );
    // Truncating beyond the end.
    assert!(matches!(
        first.truncate(s, 5),
        Err(EngineError::BadTruncate { .. })
    ));

    // The session still works, and matches a fresh one.
    let h = match first.forward(s, StepInput::Tokens(&[1, 2, 3])).unwrap() {
        StepOutput::Hidden(h) => h,
        o => panic!("first range returned {o:?}"),
    };
    assert_eq!(h.len(), 3 * 576);
    assert_eq!(first.position(s).unwrap(), 3);

    // Session slots run out, then free up.
    let s2 = first.open_session().unwrap();
    assert!(matches!(first.open_session(), Err(EngineError::Busy(2))));
    first.close_session(s2).unwrap();
    assert!(first.close_session(s2).is_err());
    first.open_session().unwrap();

    // The last range gives logits over the vocabulary.
    let l = last.open_session().unwrap();
    match last.forward(l, StepInput::Hidden(&h)).unwrap() {
        StepOutput::Logits(v) => assert_eq!(v.len(), 49152),
        o => panic!("last range returned {o:?}"),
    }
}

#[test]
fn load_refuses_what_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let paths = slices(dir.path(), &[10]);
    // A first slice without its embedding sidecar.
    std::fs::remove_file(nakshatra_slicer::embd_sidecar_path(&paths[0])).unwrap();
    let e = SliceEngine::load(&paths[0], None, &cfg(1, 512)).unwrap_err();
    assert!(matches!(e, EngineError::MissingEmbeddings { .. }), "{e}");
    // Not a GGUF.
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let e = SliceEngine::load(&junk, None, &cfg(1, 512)).unwrap_err();
    assert!(matches!(e, EngineError::Gguf { .. }), "{e}");
    // Zero sessions.
    let e = SliceEngine::load(&paths[1], None, &cfg(0, 512)).unwrap_err();
    assert!(e.to_string().contains("positive"), "{e}");
}
