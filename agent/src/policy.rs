//! Egress policy: the files operators write, their checks, and their
//! compilation to the entries of the kernel's policy maps.

mod compile;
mod diagnostic;
mod diff;
mod load;
mod model;
mod names;
mod overlap;
mod parse;
mod ports;
mod precedence;
mod secrets;
mod segments;
mod subject;
mod suggest;
mod summary;
mod warnings;

pub use compile::{
    CompiledPolicy, Compiler, DestEntry, NameEntry, RuleSet, SlotEntry, compile, evaluate,
    evaluate_learned, evaluate_name,
};
pub use diagnostic::{Diagnostic, Location, Severity};
pub use diff::{BlockChange, Effect, PolicyDiff, by_block, diff};
pub use load::{Reader, load};
pub use model::{
    Action, CredentialKind, CredentialRule, Destination, EgressRule, HTTP, HTTPS, IdentityBlock,
    IdentityPolicy, Mode, OAuthClient, OAuthGrant, PolicySet, PortSpec, Protocol,
};
pub use names::{ClassId, NameError, NameIndex, NameMatch, NamePattern};
pub(crate) use parse::looks_like_an_address;
pub use ports::{PortError, range as port_range};
pub use precedence::{RuleInfo, RuleTable};
pub use subject::{Specificity, Subject};
pub use suggest::{SuggestError, SuggestOptions, Suggester, parse_since, read_audit_log};
pub use summary::{describe_rule, summary};

/// Why a policy was refused: every problem found, sorted by file, line
/// and column. Displayed as a header line, then one `FILE:LINE:COL:
/// error: MESSAGE` line per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(.diagnostics))]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let n = diagnostics.len();
    let mut out = format!(
        "invalid policy ({n} error{}):",
        if n == 1 { "" } else { "s" }
    );
    for d in diagnostics {
        out.push('\n');
        out.push_str(&d.to_string());
    }
    out
}

#[cfg(test)]
pub(crate) mod testing;
