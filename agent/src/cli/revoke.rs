//! `idgate revoke ID` and `idgate unrevoke ID`.

use idgate::admin::{Request, Revocation};
use idgate::identity::SpiffeId;

use super::Connection;

#[derive(clap::Args)]
pub struct RevokeArgs {
    /// The SPIFFE ID.
    identity: SpiffeId,
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
    let revocation: Revocation = args.conn.request(request)?;
    args.conn.print(&revocation, |r| {
        let what = if revoke {
            "revoked"
        } else {
            "no longer revoked"
        };
        let note = if r.changed { "" } else { " (already so)" };
        println!("{} {what}{note}", r.identity);
    });
    Ok(())
}
