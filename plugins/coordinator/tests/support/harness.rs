//! The runner of the root test files (`harness = false` in Cargo.toml): libtest's command line
//! and output through libtest-mimic, so that without root every test is reported as ignored,
//! with the reason, instead of passing without having run.

use std::error::Error;
use std::fmt;
use std::process::ExitCode;

use libtest_mimic::{Arguments, Completion, Trial};

use crate::support::{TestResult, missing_root};

/// Runs the named test functions: `root_tests!(a, b)` runs `a` and `b` as tests named so.
macro_rules! root_tests {
    ($($test:ident),+ $(,)?) => {
        $crate::harness::run(&[$((stringify!($test), $test as fn() -> $crate::support::TestResult)),+])
    };
}
pub(crate) use root_tests;

/// A test body's error that reports the test as ignored, for what the machine lacks besides
/// root (the reference plugins `make tools` builds).
#[derive(Debug)]
pub struct Ignored(pub String);

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Error for Ignored {}

/// A test: its name and its body.
pub type RootTest = (&'static str, fn() -> TestResult);

/// Runs `tests` with libtest's arguments (filters, `--list`, `--test-threads`); without root
/// each is reported as ignored, with the reason, and never run.
pub fn run(tests: &[RootTest]) -> ExitCode {
    let args = Arguments::from_args();
    let missing = missing_root();
    let trials = tests
        .iter()
        .map(|&(name, body)| {
            Trial::ignorable_test(name, move || {
                if let Some(reason) = missing {
                    return Ok(Completion::ignored_with(reason));
                }
                match body() {
                    Ok(()) => Ok(Completion::Completed),
                    Err(error) => match error.downcast::<Ignored>() {
                        Ok(ignored) => Ok(Completion::ignored_with(ignored.0)),
                        Err(error) => Err(error.to_string().into()),
                    },
                }
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
