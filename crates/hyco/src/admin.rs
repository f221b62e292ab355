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
    /// Output format.
    #[arg(long, value_enum, default_value = "table", global = true)]
    output: Output,
    #[command(subcommand)]
    cmd: AdminCmd,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, for scripts.
    Json,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Hybrid connections.
    Hc {
        #[command(subcommand)]
        cmd: HcCmd,
    },
    /// Shared access rules (keys), on the namespace or on one hybrid connection.
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
        /// The endpoint speaks HTTP: `hyco manager` forwards HTTP-mode requests to it (a
        /// `hyco-mode` entry in the user metadata, which App Service ignores).
        #[arg(long)]
        http: bool,
    },
    /// List hybrid connections.
    List,
    /// One hybrid connection with its live listeners and connections.
    Show {
        /// Name.
        name: String,
    },
    /// Change the endpoint or whether senders need a token (managers pick up a new endpoint
    /// when they reconnect).
    Update {
        /// Name.
        name: String,
        /// New `host:port`.
        #[arg(long)]
        endpoint: Option<String>,
        /// Whether senders need a Send token.
        #[arg(long, value_name = "BOOL")]
        client_auth: Option<bool>,
    },
    /// Delete a hybrid connection (its listeners are disconnected).
    Delete {
        /// Name.
        name: String,
    },
    /// Listeners connected now.
    Listeners {
        /// Name.
        name: String,
    },
    /// Tunnels open now.
    Connections {
        /// Name.
        name: String,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KeyType {
    Primary,
    Secondary,
}

#[derive(Args)]
struct RuleRef {
    /// Rule (key) name.
    name: String,
    /// The rule belongs to this hybrid connection; without it, to the namespace.
    #[arg(long)]
    hc: Option<String>,
}

impl RuleRef {
    /// The rule's API path, every name checked and percent-encoded as one segment.
    fn path(&self) -> Result<String> {
        let rule = rule_segment(&self.name)?;
        Ok(match &self.hc {
            Some(hc) => format!("{}/authorizationrules/{rule}", hc_path(hc)?),
            None => format!("/authorizationrules/{rule}"),
        })
    }
}

/// `/hybridconnections/{name}` with the name checked and percent-encoded as one segment: a
/// name is never a path (`..` would collapse into the parent and address another object).
fn hc_path(name: &str) -> Result<String> {
    hyco_proto::names::check_hc_ref(name)
        .map_err(|e| usage(format!("hybrid connection {}: {e}", shown(name))))?;
    Ok(format!(
        "/hybridconnections/{}",
        hyco_proto::names::encode_segment(name)
    ))
}

/// A rule name checked and percent-encoded as one path segment.
fn rule_segment(name: &str) -> Result<String> {
    hyco_proto::names::check_rule_ref(name)
        .map_err(|e| usage(format!("rule {}: {e}", shown(name))))?;
    Ok(hyco_proto::names::encode_segment(name))
}

/// A name as typed, quoted with control characters escaped, for messages.
fn shown(name: &str) -> String {
    format!("{name:?}")
}

#[derive(Subcommand)]
enum RuleCmd {
    /// Create a rule and print its primary connection string alone on stdout.
    Create {
        #[command(flatten)]
        rule: RuleRef,
        /// Rights, comma-separated: listen, send, manage.
        #[arg(long)]
        rights: String,
    },
    /// Change a rule's rights (its keys stay).
    Update {
        #[command(flatten)]
        rule: RuleRef,
        /// Rights, comma-separated: listen, send, manage.
        #[arg(long)]
        rights: String,
    },
    /// List rules (names and rights).
    List {
        /// Rules of this hybrid connection; without it, the namespace's.
        #[arg(long)]
        hc: Option<String>,
    },
    /// A rule's name and rights.
    Show {
        #[command(flatten)]
        rule: RuleRef,
    },
    /// A rule's keys and connection strings.
    Keys {
        #[command(flatten)]
        rule: RuleRef,
    },
    /// Print one connection string of a rule alone on stdout.
    ConnectionString {
        #[command(flatten)]
        rule: RuleRef,
        /// Which key signs it.
        #[arg(long, value_enum, default_value = "primary")]
        key: KeyType,
    },
    /// Replace one key; tokens signed with the other keep working. Prints the new
    /// connection string of that key.
    Regenerate {
        #[command(flatten)]
        rule: RuleRef,
        /// Which key to replace.
        #[arg(long, value_enum)]
        key: KeyType,
    },
    /// Delete a rule (not the last namespace rule with Manage).
    Delete {
        #[command(flatten)]
        rule: RuleRef,
    },
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

struct Api {
    base: String,
    auth: String,
    connector: hyco_io::ws::Connector,
}

impl Api {
    /// `GET` a hybrid connection's `listeners` or `connections`, printed as JSON or by `table`.
    async fn show(
        &self,
        name: &str,
        what: &str,
        json_out: bool,
        table: fn(&serde_json::Value),
    ) -> Result<()> {
        let v = self.hc_get(name, what).await?;
        if json_out {
            print_json(&v);
        } else {
            table(&v);
        }
        Ok(())
    }

    /// `GET` a hybrid connection's `listeners` or `connections`.
    async fn hc_get(&self, name: &str, what: &str) -> Result<serde_json::Value> {
        let path = format!("{}/{what}", hc_path(name)?);
        self.call(http::Method::GET, &path, None).await
    }

    /// `POST …/listkeys` of a rule: its keys and connection strings.
    async fn list_keys(&self, rule_path: &str) -> Result<serde_json::Value> {
        let path = format!("{rule_path}/listkeys");
        self.call(http::Method::POST, &path, None).await
    }

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
    let connector = crate::client_options(Default::default(), a.ca_file)?.connector()?;
    let api = Api {
        base: format!("https://{}/$hyco/v1", cs.endpoint.host_port()),
        auth: token.as_str().to_owned(),
        connector,
    };
    let json_out = a.output == Output::Json;
    match a.cmd {
        AdminCmd::Hc { cmd } => match cmd {
            HcCmd::Create {
                name,
                endpoint,
                no_client_auth,
                http,
            } => {
                hyco_proto::names::validate_hc_name(&name)
                    .map_err(|e| usage(format!("hybrid connection {}: {e}", shown(&name))))?;
                let hp = parse_endpoint(&endpoint)?;
                let mut meta = hyco_proto::entity::endpoint_metadata(&hp);
                if http {
                    meta = hyco_manager::endpoint::with_http_mode(&meta);
                }
                let v = api
                    .call(
                        http::Method::PUT,
                        &hc_path(&name)?,
                        Some(serde_json::json!({
                            "requiresClientAuthorization": !no_client_auth,
                            "userMetadata": meta,
                        })),
                    )
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    eprintln!(
                        "created hybrid connection {} -> {hp}",
                        hyco_proto::escape::Escaped(v["name"].as_str().unwrap_or(&name))
                    );
                }
            }
            HcCmd::List => {
                let v = api
                    .call(http::Method::GET, "/hybridconnections", None)
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    hc_table(v["value"].as_array().map(Vec::as_slice).unwrap_or(&[]));
                }
            }
            HcCmd::Show { name } => {
                let hc = api.call(http::Method::GET, &hc_path(&name)?, None).await?;
                let listeners = api.hc_get(&name, "listeners").await?;
                let connections = api.hc_get(&name, "connections").await?;
                if json_out {
                    let mut v = hc;
                    v["listeners"] = listeners["value"].clone();
                    v["connections"] = connections["value"].clone();
                    print_json(&v);
                } else {
                    hc_table(std::slice::from_ref(&hc));
                    println!();
                    listener_table(&listeners);
                    println!();
                    connection_table(&connections);
                }
            }
            HcCmd::Update {
                name,
                endpoint,
                client_auth,
            } => {
                let mut body = serde_json::Map::new();
                if let Some(e) = &endpoint {
                    let hp = parse_endpoint(e)?;
                    body.insert(
                        "userMetadata".into(),
                        hyco_proto::entity::endpoint_metadata(&hp).into(),
                    );
                }
                if let Some(c) = client_auth {
                    body.insert("requiresClientAuthorization".into(), c.into());
                }
                if body.is_empty() {
                    return Err(usage("hc update: give --endpoint and/or --client-auth"));
                }
                let v = api
                    .call(http::Method::PATCH, &hc_path(&name)?, Some(body.into()))
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    eprintln!("updated hybrid connection {name}");
                }
            }
            HcCmd::Delete { name } => {
                api.call(http::Method::DELETE, &hc_path(&name)?, None)
                    .await?;
                if json_out {
                    print_json(&serde_json::json!({ "deleted": name }));
                } else {
                    eprintln!("deleted hybrid connection {name}");
                }
            }
            HcCmd::Listeners { name } => {
                api.show(&name, "listeners", json_out, listener_table)
                    .await?
            }
            HcCmd::Connections { name } => {
                api.show(&name, "connections", json_out, connection_table)
                    .await?
            }
        },
        AdminCmd::Rule { cmd } => match cmd {
            RuleCmd::Create { rule, rights } | RuleCmd::Update { rule, rights } => {
                let r = hyco_proto::Rights::parse_list(&rights)
                    .map_err(|e| usage(format!("--rights {rights}: {e}")))?;
                let v = api
                    .call(
                        http::Method::PUT,
                        &rule.path()?,
                        Some(serde_json::json!({ "rights": r })),
                    )
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("{}", connection_string_of(&v, KeyType::Primary)?);
                }
            }
            RuleCmd::List { hc } => {
                let path = match &hc {
                    Some(hc) => format!("{}/authorizationrules", hc_path(hc)?),
                    None => "/authorizationrules".to_owned(),
                };
                let v = api.call(http::Method::GET, &path, None).await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("{:<32} RIGHTS", "NAME");
                    for r in v["value"].as_array().into_iter().flatten() {
                        println!("{:<32} {}", str_of(&r["name"]), rights_of(&r["rights"]));
                    }
                }
            }
            RuleCmd::Show { rule } => {
                let v = api.call(http::Method::GET, &rule.path()?, None).await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("{:<32} RIGHTS", "NAME");
                    println!("{:<32} {}", str_of(&v["name"]), rights_of(&v["rights"]));
                }
            }
            RuleCmd::Keys { rule } => {
                let v = api.list_keys(&rule.path()?).await?;
                if json_out {
                    print_json(&v);
                } else {
                    for (label, field) in [
                        ("name", "keyName"),
                        ("primary key", "primaryKey"),
                        ("secondary key", "secondaryKey"),
                        ("primary connection string", "primaryConnectionString"),
                        ("secondary connection string", "secondaryConnectionString"),
                    ] {
                        println!("{label:<28} {}", str_of(&v[field]));
                    }
                    println!("{:<28} {}", "rights", rights_of(&v["rights"]));
                }
            }
            RuleCmd::ConnectionString { rule, key } => {
                let v = api.list_keys(&rule.path()?).await?;
                println!("{}", connection_string_of(&v, key)?);
            }
            RuleCmd::Regenerate { rule, key } => {
                let key_type = match key {
                    KeyType::Primary => "PrimaryKey",
                    KeyType::Secondary => "SecondaryKey",
                };
                let v = api
                    .call(
                        http::Method::POST,
                        &format!("{}/regeneratekeys", rule.path()?),
                        Some(serde_json::json!({ "keyType": key_type })),
                    )
                    .await?;
                if json_out {
                    print_json(&v);
                } else {
                    println!("{}", connection_string_of(&v, key)?);
                }
            }
            RuleCmd::Delete { rule } => {
                api.call(http::Method::DELETE, &rule.path()?, None).await?;
                if json_out {
                    print_json(&serde_json::json!({ "deleted": rule.name }));
                } else {
                    eprintln!("deleted rule {}", rule.name);
                }
            }
        },
    }
    Ok(())
}

fn parse_endpoint(e: &str) -> Result<HostPort> {
    e.parse()
        .map_err(|err| usage(format!("--endpoint {e}: {err}")))
}

/// A string of the relay's answer for a terminal: control characters escaped.
fn str_of(v: &serde_json::Value) -> String {
    hyco_proto::escape::escaped(v.as_str().unwrap_or("-"))
}

fn rights_of(v: &serde_json::Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.as_str())
        .map(hyco_proto::escape::escaped)
        .collect::<Vec<_>>()
        .join(",")
}

fn connection_string_of(v: &serde_json::Value, key: KeyType) -> Result<String> {
    let field = match key {
        KeyType::Primary => "primaryConnectionString",
        KeyType::Secondary => "secondaryConnectionString",
    };
    v[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the relay's answer has no {field}"))
}

fn hc_table(list: &[serde_json::Value]) {
    println!(
        "{:<32} {:<28} {:>9} {:>11}",
        "NAME", "ENDPOINT", "LISTENERS", "CLIENT-AUTH"
    );
    for hc in list {
        let endpoint = hc["userMetadata"]
            .as_str()
            .and_then(|m| hyco_proto::entity::parse_endpoint_metadata(m).ok())
            .map(|hp| hp.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:<28} {:>9} {:>11}",
            str_of(&hc["name"]),
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

fn listener_table(v: &serde_json::Value) {
    println!(
        "{:<38} {:<24} {:<22} LAST-SEEN",
        "LISTENER", "ADDRESS", "SINCE"
    );
    for l in v["value"].as_array().into_iter().flatten() {
        println!(
            "{:<38} {:<24} {:<22} {}",
            str_of(&l["id"]),
            str_of(&l["remoteAddress"]),
            str_of(&l["since"]),
            str_of(&l["lastSeen"])
        );
    }
}

fn connection_table(v: &serde_json::Value) {
    println!(
        "{:<34} {:<24} {:<22} {:>14} {:>14}",
        "CONNECTION", "SENDER", "SINCE", "TO-LISTENER", "TO-SENDER"
    );
    for c in v["value"].as_array().into_iter().flatten() {
        println!(
            "{:<34} {:<24} {:<22} {:>14} {:>14}",
            str_of(&c["id"]),
            str_of(&c["senderAddress"]),
            str_of(&c["since"]),
            c["bytesSenderToListener"].as_u64().unwrap_or(0),
            c["bytesListenerToSender"].as_u64().unwrap_or(0)
        );
    }
}
