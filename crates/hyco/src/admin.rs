//! `hyco admin …`: calls the relay's management API with a Manage key.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use hyco_proto::address::HostPort;
use hyco_proto::{ConnectionString, ConnectionStringAuth};

use crate::usage;

#[derive(Args)]
pub struct AdminArgs {
    /// Connection string of a rule with Manage rights (the root one, for instance).
    #[arg(
        long,
        env = "HYCO_CONNECTION_STRING",
        global = true,
        hide_env_values = true
    )]
    connection_string: Option<String>,
    /// Extra CA certificate to trust (PEM), besides the system roots.
    #[arg(long, env = "HYCO_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Hybrid connections.
    Hc {
        #[command(subcommand)]
        cmd: HcCmd,
    },
    /// Shared access rules.
    Rule {
        #[command(subcommand)]
        cmd: RuleCmd,
    },
}

#[derive(Subcommand)]
enum HcCmd {
    /// Create a hybrid connection whose manager dials HOST:PORT.
    Create {
        /// Name.
        name: String,
        /// The fixed `host:port` the manager connects to.
        #[arg(long)]
        endpoint: String,
        /// Let senders connect without a token.
        #[arg(long)]
        no_client_auth: bool,
    },
    /// List hybrid connections.
    List,
    /// Delete a hybrid connection (its listeners are disconnected).
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Subcommand)]
enum RuleCmd {
    /// Create a rule and print its connection string alone on stdout.
    Create {
        /// Rule (key) name.
        name: String,
        /// Scope it to this hybrid connection; without it the rule covers the namespace.
        #[arg(long)]
        hc: Option<String>,
        /// Rights, comma-separated: listen, send, manage.
        #[arg(long)]
        rights: String,
    },
}

struct Api {
    base: String,
    auth: String,
    connector: hyco_io::ws::Connector,
}

impl Api {
    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let url = format!("{}{}", self.base, path);
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let ans = self
            .connector
            .https_request(
                method,
                &url,
                &[
                    ("Authorization", &self.auth),
                    ("Content-Type", "application/json"),
                ],
                body,
                1 << 20,
            )
            .await
            .with_context(|| format!("cannot reach the relay at {}", self.base))?;
        let v: serde_json::Value = if ans.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&ans.body).unwrap_or(serde_json::Value::Null)
        };
        if !(200..300).contains(&ans.status) {
            let msg = v["error"]["message"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or(ans.reason);
            bail!("relay answered {}: {msg}", ans.status);
        }
        Ok(v)
    }
}

pub async fn run(a: AdminArgs) -> Result<()> {
    let raw = a.connection_string.ok_or_else(|| {
        usage("give --connection-string or set HYCO_CONNECTION_STRING (a rule with Manage)")
    })?;
    let cs =
        ConnectionString::parse(&raw).map_err(|e| usage(format!("--connection-string: {e}")))?;
    let ConnectionStringAuth::Key { name, key } = &cs.auth else {
        return Err(usage(
            "the admin connection string must carry SharedAccessKeyName and SharedAccessKey",
        ));
    };
    let expiry = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs()
        + Duration::from_secs(600).as_secs();
    let token = hyco_proto::sas::sign(
        &hyco_proto::sas::resource_uri(&cs.endpoint.host, None),
        name,
        key,
        expiry,
    );
    let connector = crate::client_options(a.ca_file).connector()?;
    let api = Api {
        base: format!("https://{}/$hyco/v1", cs.endpoint.host_port()),
        auth: token.as_str().to_owned(),
        connector,
    };
    match a.cmd {
        AdminCmd::Hc {
            cmd:
                HcCmd::Create {
                    name,
                    endpoint,
                    no_client_auth,
                },
        } => {
            let hp: HostPort = endpoint
                .parse()
                .map_err(|e| usage(format!("--endpoint {endpoint}: {e}")))?;
            let v = api
                .call(
                    http::Method::PUT,
                    &format!("/hybridconnections/{name}"),
                    Some(serde_json::json!({
                        "requiresClientAuthorization": !no_client_auth,
                        "userMetadata": hyco_proto::entity::endpoint_metadata(&hp),
                    })),
                )
                .await?;
            eprintln!(
                "created hybrid connection {} -> {hp}",
                v["name"].as_str().unwrap_or(&name)
            );
        }
        AdminCmd::Hc { cmd: HcCmd::List } => {
            let v = api
                .call(http::Method::GET, "/hybridconnections", None)
                .await?;
            println!(
                "{:<32} {:<28} {:>9} {:>11}",
                "NAME", "ENDPOINT", "LISTENERS", "CLIENT-AUTH"
            );
            for hc in v["value"].as_array().into_iter().flatten() {
                let endpoint = hc["userMetadata"]
                    .as_str()
                    .and_then(|m| hyco_proto::entity::parse_endpoint_metadata(m).ok())
                    .map(|hp| hp.to_string())
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<32} {:<28} {:>9} {:>11}",
                    hc["name"].as_str().unwrap_or("?"),
                    endpoint,
                    hc["listenerCount"].as_u64().unwrap_or(0),
                    if hc["requiresClientAuthorization"].as_bool().unwrap_or(true) {
                        "required"
                    } else {
                        "off"
                    }
                );
            }
        }
        AdminCmd::Hc {
            cmd: HcCmd::Delete { name },
        } => {
            api.call(
                http::Method::DELETE,
                &format!("/hybridconnections/{name}"),
                None,
            )
            .await?;
            eprintln!("deleted hybrid connection {name}");
        }
        AdminCmd::Rule {
            cmd: RuleCmd::Create { name, hc, rights },
        } => {
            let r = hyco_proto::Rights::parse_list(&rights)
                .map_err(|e| usage(format!("--rights {rights}: {e}")))?;
            let path = match &hc {
                Some(hc) => format!("/hybridconnections/{hc}/authorizationrules/{name}"),
                None => format!("/authorizationrules/{name}"),
            };
            let v = api
                .call(
                    http::Method::PUT,
                    &path,
                    Some(serde_json::json!({ "rights": r })),
                )
                .await?;
            let s = v["primaryConnectionString"]
                .as_str()
                .ok_or_else(|| anyhow!("the relay's answer has no connection string"))?;
            println!("{s}");
        }
    }
    Ok(())
}
