//! Command-line access to the slicer, for manual checks:
//!
//! ```text
//! cargo run --release -p nakshatra-slicer --example slice -- inspect MODEL.gguf
//! cargo run --release -p nakshatra-slicer --example slice -- slice MODEL.gguf START END OUT.gguf
//! ```
//!
//! Prints the resulting `ModelInfo` as JSON.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["inspect", path] => nakshatra_slicer::inspect(Path::new(path)),
        ["slice", src, start, end, out] => match (start.parse(), end.parse()) {
            (Ok(start), Ok(end)) => {
                nakshatra_slicer::write_slice(Path::new(src), start, end, Path::new(out))
                    .map(|o| o.info)
            }
            _ => {
                eprintln!("START and END must be layer numbers");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: slice inspect MODEL | slice slice MODEL START END OUT");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(info) => match serde_json::to_string_pretty(&info) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
