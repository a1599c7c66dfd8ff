//! Per-step timing traces (`--trace-steps FILE` on `node join` and `node
//! ask`): where each microsecond of a chain step goes.
//!
//! Every line is one step at one place in the chain, with the wall-clock
//! times (microseconds since the Unix epoch) at which the step passed each
//! stage. Wall-clock, not a process's own monotonic clock, so that the
//! lines of several processes on one host line up: the gap between one
//! hop's `sent` and the next hop's `in` is the link (yamux, noise, TCP and
//! the wake-ups on both sides).
//!
//! Lines (tab-separated, `#` starts the header):
//! - a hop: `hop <session> <step> <n_tokens> <index> <in> <decoded>
//!   <picked> <computed> <resumed> <encoded> <sent>`: frame read, input
//!   decoded, engine lock taken, forward done,
//!   result back on the async task, output encoded (or sampled, at the last
//!   hop), frame written (the tokens, at the last hop: their digests
//!   follow, off the step's path);
//! - the asker: `ask <session> <step> <n_tokens> <start> <sent> <token>`:
//!   step started, frame written to the first hop, token read.
//!
//! A trace costs a few clock reads and one buffered write per step; lines
//! go out when the buffer fills, at the end of each session and when the
//! trace is dropped. A killed process loses what was buffered; a reader
//! skips a last line cut short (it does not parse).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, now (0 if the clock is before it).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A step trace file, shared by a process's sessions.
#[derive(Debug)]
pub struct StepTrace {
    out: Mutex<BufWriter<File>>,
}

/// The stages of one step at a hop (microseconds since the Unix epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HopTimes {
    /// The step's frame was read whole.
    pub input: u64,
    /// Its input was decoded.
    pub decoded: u64,
    /// The engine lock was taken (the forward starts).
    pub picked: u64,
    /// The forward pass finished.
    pub computed: u64,
    /// The result was back on the session's task.
    pub resumed: u64,
    /// The output was encoded (hidden states) or sampled (last hop).
    pub encoded: u64,
    /// The output frame was written (the last hop: its token frames).
    pub sent: u64,
}

/// The stages of one step at the asker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AskTimes {
    /// The step started.
    pub start: u64,
    /// Its frame was written to the first hop.
    pub sent: u64,
    /// Its token was read.
    pub token: u64,
}

impl StepTrace {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path) -> std::io::Result<StepTrace> {
        let mut out = BufWriter::new(File::create(path)?);
        writeln!(
            out,
            "# hop session step n_tokens index in decoded picked computed resumed encoded sent\n\
             # ask session step n_tokens start sent token"
        )?;
        Ok(StepTrace {
            out: Mutex::new(out),
        })
    }

    fn line(&self, args: std::fmt::Arguments<'_>) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.write_fmt(args) {
            tracing::debug!("step trace: {e}");
        }
    }

    /// One step at hop `index`.
    pub fn hop(&self, session: u64, step: u64, n_tokens: u32, index: u32, t: &HopTimes) {
        self.line(format_args!(
            "hop\t{session}\t{step}\t{n_tokens}\t{index}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
            t.input, t.decoded, t.picked, t.computed, t.resumed, t.encoded, t.sent
        ));
    }

    /// One step at the asker.
    pub fn ask(&self, session: u64, step: u64, n_tokens: u32, t: &AskTimes) {
        self.line(format_args!(
            "ask\t{session}\t{step}\t{n_tokens}\t{}\t{}\t{}\n",
            t.start, t.sent, t.token
        ));
    }

    /// Writes what is buffered.
    pub fn flush(&self) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.flush() {
            tracing::debug!("step trace: {e}");
        }
    }
}

impl Drop for StepTrace {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_every_stage_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.tsv");
        let t = StepTrace::create(&path).unwrap();
        let h = HopTimes {
            input: 1,
            decoded: 2,
            picked: 3,
            computed: 4,
            resumed: 5,
            encoded: 6,
            sent: 7,
        };
        t.hop(9, 3, 1, 2, &h);
        t.ask(
            9,
            3,
            1,
            &AskTimes {
                start: 10,
                sent: 11,
                token: 12,
            },
        );
        drop(t);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "hop\t9\t3\t1\t2\t1\t2\t3\t4\t5\t6\t7",
                "ask\t9\t3\t1\t10\t11\t12"
            ]
        );
    }
}
