//! `idgate revoke ID` and `idgate unrevoke ID`.

use idgate::admin::Request;

use super::{Connection, text};

#[derive(clap::Args)]
pub struct RevokeArgs {
    /// The SPIFFE ID.
    identity: String,
    #[command(flatten)]
    conn: Connection,
}

pub fn run(args: RevokeArgs, revoke: bool) -> anyhow::Result<()> {
    let request = if revoke {
        Request::Revoke {
            identity: args.identity,
        }
    } else {
        Request::Unrevoke {
            identity: args.identity,
        }
    };
    let reply = args.conn.request(request)?;
    args.conn.print(&reply, |r| {
        let what = if revoke {
            "revoked"
        } else {
            "no longer revoked"
        };
        let note = if r["changed"] == serde_json::Value::Bool(true) {
            ""
        } else {
            " (already so)"
        };
        println!("{} {what}{note}", text(&r["identity"]));
    });
    Ok(())
}
