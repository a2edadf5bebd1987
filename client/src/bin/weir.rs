//! `weir`: the command line for topics, producing, consuming and the cluster.
//!
//! Exit codes: 0 success; 1 any other failure; 2 bad usage; 3 the broker is
//! unreachable; 4 the topic does not exist; 5 the group does not exist; 6 the
//! group is not empty; 7 the broker refused the connection at its
//! connection limit.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use weir_client::{
    Admin, ClientError, Consumer, ConsumerConfig, Offset, Producer, ProducerConfig, ProducerRecord,
};
use weir_protocol::ErrorCode;

#[derive(Debug, Parser)]
#[command(
    name = "weir",
    about = "Weir command line: topics, produce, consume, cluster"
)]
struct Cli {
    /// Broker address: `host:port`, or several comma-separated (a cluster).
    #[arg(
        long,
        short,
        global = true,
        env = "WEIR_BROKER",
        default_value = "127.0.0.1:9092"
    )]
    broker: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, list, describe or delete topics.
    Topic {
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// Produce lines from stdin (or a file) as records.
    Produce {
        /// Topic.
        topic: String,
        /// Read lines from this file instead of stdin.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Key for every record.
        #[arg(long)]
        key: Option<String>,
        /// Split each line into key and value at the first occurrence of this.
        #[arg(long)]
        key_separator: Option<String>,
        /// Header `name=value` on every record (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Send to this partition.
        #[arg(long)]
        partition: Option<u32>,
        /// Most records per second.
        #[arg(long)]
        rate: Option<u64>,
        /// Compression of the batches sent.
        #[arg(long, value_enum, default_value_t = Codec::None)]
        compression: Codec,
    },
    /// Print records of a topic.
    Consume {
        /// Topic.
        topic: String,
        /// Only this partition (default: all).
        #[arg(long)]
        partition: Option<u32>,
        /// `earliest`, `latest`, an offset, or `@<timestamp ms>`.
        #[arg(long, default_value = "earliest")]
        from: String,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Keep waiting for new records (default: stop at the current end).
        #[arg(long)]
        follow: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Consume as a member of this group: partitions come from the
        /// group, reading starts at its committed offsets (`--from` where
        /// there are none) and positions are committed automatically.
        /// Keeps following until `--count` or Ctrl-C.
        #[arg(long)]
        group: Option<String>,
        /// Auto-commit interval with `--group`, ms.
        #[arg(long, default_value_t = 5_000)]
        commit_interval_ms: u64,
        /// Session timeout with `--group`, ms.
        #[arg(long, default_value_t = 10_000)]
        session_timeout_ms: u32,
    },
    /// Consumer groups: list, describe, reset offsets.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Cluster commands.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Partition commands.
    Partition {
        #[command(subcommand)]
        command: PartitionCommand,
    },
}

#[derive(Debug, Subcommand)]
enum PartitionCommand {
    /// Moves a partition's replicas to other brokers: the new replicas
    /// catch up before the old are dropped, so nothing stops meanwhile.
    /// Waits until the move is done.
    Reassign {
        /// Topic.
        topic: String,
        /// Partition.
        #[arg(long)]
        partition: u32,
        /// Broker ids to move to, comma-separated, the preferred leader
        /// first.
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<u32>,
        /// Longest wait for the move to finish, seconds.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
}

#[derive(Debug, Subcommand)]
enum TopicCommand {
    /// Create a topic.
    Create {
        /// Name.
        name: String,
        /// Partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Copies of each partition (default: 3, or the number of brokers
        /// if fewer).
        #[arg(long)]
        replication_factor: Option<u16>,
    },
    /// List topics.
    List,
    /// Partitions, offsets and sizes of a topic.
    Describe {
        /// Name.
        name: String,
    },
    /// Delete a topic and its data.
    Delete {
        /// Name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Groups with their state and member count.
    List,
    /// Members, assignment, committed offsets and lag of a group.
    Describe {
        /// Group.
        group: String,
    },
    /// Sets a group's committed offsets for a topic (the group must have
    /// no members). Prints the plan; changes nothing without `--execute`.
    ResetOffsets {
        /// Group.
        group: String,
        /// Topic whose partitions are reset.
        #[arg(long)]
        topic: String,
        /// `earliest`, `latest`, an offset, or `@<timestamp ms>`.
        #[arg(long)]
        to: String,
        /// Apply the plan (default: dry run).
        #[arg(long)]
        execute: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Brokers and topics.
    Info,
}

/// The batch compression codecs `weir produce` offers (Kafka's five).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Codec {
    /// Uncompressed.
    None,
    /// gzip.
    Gzip,
    /// snappy (xerial framing, as the Java client writes it).
    Snappy,
    /// LZ4 frames.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl From<Codec> for weir_protocol::Compression {
    fn from(codec: Codec) -> Self {
        match codec {
            Codec::None => weir_protocol::Compression::None,
            Codec::Gzip => weir_protocol::Compression::Gzip,
            Codec::Snappy => weir_protocol::Compression::Snappy,
            Codec::Lz4 => weir_protocol::Compression::Lz4,
            Codec::Zstd => weir_protocol::Compression::Zstd,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    /// Each record's value on a line.
    Text,
    /// One JSON object per record.
    Json,
}

/// A progress bar on stderr when it is a terminal; hidden otherwise (pipes,
/// scripts, tests).
fn progress(what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{{spinner}} {{pos}} records {what} ({{per_sec}}) {{elapsed}}"
    )) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn exit_code(error: &anyhow::Error) -> ExitCode {
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Connect { .. }) => ExitCode::from(3),
        Some(ClientError::UnknownTopic(_)) => ExitCode::from(4),
        Some(ClientError::Broker(ErrorCode::UnknownTopicOrPartition)) => ExitCode::from(4),
        Some(ClientError::Broker(ErrorCode::UnknownGroup)) => ExitCode::from(5),
        Some(ClientError::Broker(ErrorCode::GroupNotEmpty)) => ExitCode::from(6),
        Some(ClientError::TooManyConnections { .. }) => ExitCode::from(7),
        _ => ExitCode::from(1),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "weir: {error}");
            exit_code(&error)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Topic { command } => topic(&cli.broker, command).await,
        Command::Produce {
            topic,
            file,
            key,
            key_separator,
            headers,
            partition,
            rate,
            compression,
        } => {
            produce(
                &cli.broker,
                &topic,
                file,
                key,
                key_separator,
                headers,
                partition,
                rate,
                compression.into(),
            )
            .await
        }
        Command::Consume {
            topic,
            partition: _,
            from,
            count,
            follow: _,
            format,
            group: Some(group),
            commit_interval_ms,
            session_timeout_ms,
        } => {
            let config = weir_client::GroupConfig {
                auto_commit_interval_ms: commit_interval_ms,
                session_timeout_ms,
                heartbeat_interval_ms: u64::from(session_timeout_ms / 5).max(50),
                reset: parse_from(&from)?,
                ..weir_client::GroupConfig::default()
            };
            consume_group(&cli.broker, &topic, &group, config, count, format).await
        }
        Command::Consume {
            topic,
            partition,
            from,
            count,
            follow,
            format,
            group: None,
            ..
        } => consume(&cli.broker, &topic, partition, &from, count, follow, format).await,
        Command::Group { command } => group(&cli.broker, command).await,
        Command::Partition {
            command:
                PartitionCommand::Reassign {
                    topic,
                    partition,
                    replicas,
                    timeout_s,
                },
        } => {
            let admin = Admin::connect(&cli.broker).await?;
            admin
                .reassign_partition(&topic, partition, &replicas)
                .await?;
            println!("moving {topic}/{partition} to brokers {replicas:?}");
            admin
                .wait_for_replicas(
                    &topic,
                    partition,
                    &replicas,
                    std::time::Duration::from_secs(timeout_s),
                )
                .await
                .map_err(|error| {
                    anyhow::anyhow!(
                        "{topic}/{partition} not on {replicas:?} within {timeout_s} s ({error}); \
                         `weir topic describe {topic}` shows where it is"
                    )
                })?;
            println!("{topic}/{partition} now lives on brokers {replicas:?}");
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::Info,
        } => {
            let admin = Admin::connect(&cli.broker).await?;
            let metadata = admin.metadata(None).await?;
            println!(
                "cluster {} (controller {})",
                metadata.cluster_id, metadata.controller_id
            );
            for broker in metadata.brokers {
                println!("broker {} at {}:{}", broker.id, broker.host, broker.port);
            }
            for id in metadata.fenced_brokers {
                println!("broker {id} fenced (down, stopping or catching up; leads nothing)");
            }
            println!("{} topics", metadata.topics.len());
            Ok(())
        }
    }
}

async fn topic(broker: &str, command: TopicCommand) -> anyhow::Result<()> {
    let admin = Admin::connect(broker).await?;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            replication_factor,
        } => {
            admin
                .create_topic_replicated(&name, partitions, replication_factor.unwrap_or(0))
                .await?;
            println!("created topic {name} with {partitions} partitions");
        }
        TopicCommand::List => {
            for topic in admin.list_topics().await? {
                println!("{}\t{} partitions", topic.name, topic.partitions.len());
            }
        }
        TopicCommand::Describe { name } => {
            let description = admin.describe_topic(&name).await?;
            let metadata = admin.metadata(Some(vec![name.clone()])).await?;
            let placement = metadata.topics.into_iter().next();
            let ids = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            println!("topic {}", description.name);
            println!(
                "partition\tleader\treplicas\tin_sync\tstart\tend\thigh_watermark\tbytes\tsegments"
            );
            for partition in description.partitions {
                let placed = placement.as_ref().and_then(|topic| {
                    topic
                        .partitions
                        .iter()
                        .find(|entry| entry.partition == partition.partition)
                });
                let (leader, replicas, in_sync) = placed.map_or(
                    ("-".to_string(), "-".to_string(), "-".to_string()),
                    |entry| {
                        (
                            entry.leader.to_string(),
                            ids(&entry.replicas),
                            ids(&entry.in_sync_replicas),
                        )
                    },
                );
                println!(
                    "{}\t{leader}\t{replicas}\t{in_sync}\t{}\t{}\t{}\t{}\t{}",
                    partition.partition,
                    partition.start_offset,
                    partition.end_offset,
                    partition.high_watermark,
                    partition.size_bytes,
                    partition.segments
                );
            }
        }
        TopicCommand::Delete { name } => {
            admin.delete_topic(&name).await?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn produce(
    broker: &str,
    topic: &str,
    file: Option<std::path::PathBuf>,
    key: Option<String>,
    key_separator: Option<String>,
    headers: Vec<String>,
    partition: Option<u32>,
    rate: Option<u64>,
    compression: weir_protocol::Compression,
) -> anyhow::Result<()> {
    let producer = Producer::connect(
        broker,
        ProducerConfig {
            compression,
            ..ProducerConfig::default()
        },
    )
    .await?;
    let headers: Vec<(String, Bytes)> = headers
        .iter()
        .map(|header| match header.split_once('=') {
            Some((name, value)) => Ok((name.to_string(), Bytes::from(value.to_string()))),
            None => Err(anyhow::anyhow!("header {header:?} is not name=value")),
        })
        .collect::<anyhow::Result<_>>()?;
    let reader: Box<dyn BufRead> = match file {
        Some(path) => Box::new(std::io::BufReader::new(std::fs::File::open(&path)?)),
        None => Box::new(std::io::BufReader::new(std::io::stdin())),
    };
    let started = Instant::now();
    // Outstanding deliveries, oldest first; settled ones are dropped as we go
    // so memory follows the producer's buffer, not the size of the input.
    let mut deliveries = std::collections::VecDeque::new();
    let mut failed = 0u64;
    let mut sent = 0u64;
    let bar = progress("produced");
    for line in reader.lines() {
        let line = line?;
        let (record_key, value) = match (&key_separator, &key) {
            (Some(separator), _) => match line.split_once(separator.as_str()) {
                Some((k, v)) => (Some(k.to_string()), v.to_string()),
                None => (key.clone(), line),
            },
            (None, key) => (key.clone(), line),
        };
        let mut record = ProducerRecord::new(value);
        if let Some(record_key) = record_key {
            record = record.key(record_key);
        }
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        for (name, value) in &headers {
            record = record.header(name.clone(), value.clone());
        }
        deliveries.push_back(producer.send(topic, record).await?);
        sent += 1;
        while let Some(front) = deliveries.front_mut() {
            match front.try_delivery() {
                Some(Ok(_)) => {}
                Some(Err(_)) => failed += 1,
                None => break,
            }
            deliveries.pop_front();
        }
        bar.inc(1);
        if let Some(rate) = rate.filter(|rate| *rate > 0) {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    producer.flush().await?;
    let mut first_error = None;
    for delivery in deliveries {
        if let Err(error) = delivery.await {
            failed += 1;
            first_error.get_or_insert(error);
        }
    }
    bar.finish_and_clear();
    if failed > 0 {
        match first_error {
            Some(error) => anyhow::bail!("{failed} of {sent} records were not delivered: {error}"),
            None => anyhow::bail!("{failed} of {sent} records were not delivered"),
        }
    }
    eprintln!("produced {sent} records to {topic}");
    Ok(())
}

fn parse_from(from: &str) -> anyhow::Result<Offset> {
    Ok(match from {
        "earliest" => Offset::Earliest,
        "latest" => Offset::Latest,
        timestamp if timestamp.starts_with('@') => Offset::Timestamp(timestamp[1..].parse()?),
        offset => {
            Offset::At(offset.parse().map_err(|_| {
                anyhow::anyhow!("--from must be earliest, latest, an offset or @<ms>")
            })?)
        }
    })
}

async fn consume(
    broker: &str,
    topic: &str,
    partition: Option<u32>,
    from: &str,
    count: Option<u64>,
    follow: bool,
    format: Format,
) -> anyhow::Result<()> {
    let start = parse_from(from)?;
    let admin = Admin::connect(broker).await?;
    let partitions: Vec<u32> = match partition {
        Some(partition) => vec![partition],
        None => (0..admin.partition_count(topic).await?).collect(),
    };
    // Without --follow, stop at each partition's end as it is now.
    let mut ends = std::collections::HashMap::new();
    for partition in &partitions {
        ends.insert(*partition, admin.list_offset(topic, *partition, -1).await?);
    }
    let mut consumer = Consumer::connect(broker, ConsumerConfig::default()).await?;
    let mut open = 0;
    for partition in &partitions {
        consumer.assign(topic, *partition, start).await?;
        let position = consumer.position(topic, *partition).unwrap_or(0);
        if follow || position < ends[partition] {
            open += 1;
        } else {
            consumer.unassign(topic, *partition).await?;
        }
    }
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    let bar = progress("consumed");
    while open > 0 && count.is_none_or(|count| printed < count) {
        let Some(record) = consumer.next().await else {
            break;
        };
        let record = record?;
        print_record(&stdout, &record, format)?;
        printed += 1;
        bar.inc(1);
        if !follow && record.offset + 1 >= ends[&record.partition] {
            consumer.unassign(topic, record.partition).await?;
            open -= 1;
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn print_record(
    stdout: &std::io::Stdout,
    record: &weir_client::ConsumerRecord,
    format: Format,
) -> anyhow::Result<()> {
    let mut out = stdout.lock();
    {
        match format {
            Format::Text => {
                let value = record
                    .value
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                writeln!(out, "{value}")?;
            }
            Format::Json => {
                let text = |bytes: Option<&Bytes>| {
                    bytes.map(|bytes| String::from_utf8_lossy(bytes).into_owned())
                };
                let headers: serde_json::Map<String, serde_json::Value> = record
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        (
                            name.clone(),
                            text(value.as_ref())
                                .map_or(serde_json::Value::Null, serde_json::Value::String),
                        )
                    })
                    .collect();
                let object = serde_json::json!({
                    "topic": &*record.topic,
                    "partition": record.partition,
                    "offset": record.offset,
                    "timestamp_ms": record.timestamp_ms,
                    "key": text(record.key.as_ref()),
                    "value": text(record.value.as_ref()),
                    "headers": headers,
                });
                writeln!(out, "{object}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

async fn consume_group(
    broker: &str,
    topic: &str,
    group: &str,
    config: weir_client::GroupConfig,
    count: Option<u64>,
    format: Format,
) -> anyhow::Result<()> {
    let mut consumer = Consumer::connect(broker, ConsumerConfig::default()).await?;
    consumer
        .subscribe_with(group, &[topic], config, None)
        .await?;
    let stdout = std::io::stdout();
    let bar = progress("consumed");
    let mut printed = 0u64;
    while count.is_none_or(|count| printed < count) {
        let next = tokio::select! {
            next = consumer.next() => next,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(record) = next else {
            break;
        };
        let printed_ok = record
            .map_err(anyhow::Error::from)
            .and_then(|record| print_record(&stdout, &record, format));
        if let Err(error) = printed_ok {
            // Leave cleanly even so: commit what was printed, free the
            // partitions now rather than after the session timeout.
            let _ = consumer.close().await;
            return Err(error);
        }
        printed += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    consumer.close().await?;
    Ok(())
}

async fn group(broker: &str, command: GroupCommand) -> anyhow::Result<()> {
    let admin = Admin::connect(broker).await?;
    match command {
        GroupCommand::List => {
            for listing in admin.list_groups().await? {
                println!(
                    "{}\t{}\t{} members",
                    listing.group, listing.state, listing.members
                );
            }
        }
        GroupCommand::Describe { group } => {
            let description = admin.describe_group(&group).await?;
            println!(
                "group {} state {} assignor {} generation {}",
                description.group, description.state, description.assignor, description.generation
            );
            for member in &description.members {
                let owned: Vec<String> = member
                    .assignment
                    .iter()
                    .map(|owned| format!("{}-{}", owned.topic, owned.partition))
                    .collect();
                println!("member {} owns [{}]", member.member_id, owned.join(", "));
            }
            println!("topic\tpartition\tcommitted\tend\tlag");
            for offset in &description.offsets {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    offset.topic,
                    offset.partition,
                    offset.committed,
                    offset.high_watermark,
                    offset.lag
                );
            }
        }
        GroupCommand::ResetOffsets {
            group,
            topic,
            to,
            execute,
        } => {
            let target = parse_from(&to)?;
            let current: std::collections::HashMap<(String, u32), i64> = admin
                .group_offsets(&group)
                .await?
                .into_iter()
                .map(|(topic, partition, offset)| ((topic, partition), offset))
                .collect();
            let mut plan = Vec::new();
            for partition in 0..admin.partition_count(&topic).await? {
                let offset = admin.resolve_offset(&topic, partition, target).await?;
                let before = current
                    .get(&(topic.clone(), partition))
                    .copied()
                    .unwrap_or(-1);
                println!("{topic}\t{partition}\t{before} -> {offset}");
                plan.push((topic.clone(), partition, offset));
            }
            if execute {
                admin.set_group_offsets(&group, &plan).await?;
                println!(
                    "reset {} partitions of {topic} for group {group}",
                    plan.len()
                );
            } else {
                println!("dry run: nothing changed (add --execute to apply)");
            }
        }
    }
    Ok(())
}
