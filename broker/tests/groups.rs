//! Consumer groups over the raw protocol against the real broker binary.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{BrokerProcess, Client, Connect, DEADLINE};
use weir_protocol::message::*;
use weir_protocol::{ErrorCode, Request, Response};

fn join(client: &mut Client, group: &str, member_id: &str, topics: &[&str]) -> JoinGroupResponse {
    join_as(client, group, member_id, None, 1_500, topics)
}

fn join_as(
    client: &mut Client,
    group: &str,
    member_id: &str,
    instance: Option<&str>,
    session_timeout_ms: u32,
    topics: &[&str],
) -> JoinGroupResponse {
    client.find_coordinator(group);
    let Response::JoinGroup(response) = client.call(Request::JoinGroup(JoinGroupRequest {
        group: group.into(),
        member_id: member_id.into(),
        group_instance_id: instance.map(str::to_string),
        session_timeout_ms,
        rebalance_timeout_ms: 10_000,
        topics: topics.iter().map(|topic| topic.to_string()).collect(),
        assignor: "range".into(),
    })) else {
        panic!("wrong response")
    };
    response
}

fn heartbeat(client: &mut Client, group: &str, generation: i32, member_id: &str) -> ErrorCode {
    let Response::Heartbeat(ack) = client.call(Request::Heartbeat(HeartbeatRequest {
        group: group.into(),
        generation,
        member_id: member_id.into(),
    })) else {
        panic!("wrong response")
    };
    ack.error
}

fn commit(
    client: &mut Client,
    group: &str,
    generation: i32,
    member_id: &str,
    offsets: &[(&str, u32, u64)],
) -> OffsetCommitResponse {
    client.find_coordinator(group);
    let Response::OffsetCommit(response) =
        client.call(Request::OffsetCommit(OffsetCommitRequest {
            group: group.into(),
            generation,
            member_id: member_id.into(),
            offsets: offsets
                .iter()
                .map(|(topic, partition, offset)| OffsetCommitPartition {
                    topic: topic.to_string(),
                    partition: *partition,
                    offset: *offset,
                    metadata: None,
                })
                .collect(),
        }))
    else {
        panic!("wrong response")
    };
    response
}

fn committed(client: &mut Client, group: &str) -> Vec<(String, u32, i64)> {
    client.find_coordinator(group);
    let Response::OffsetFetch(response) = client.call(Request::OffsetFetch(OffsetFetchRequest {
        group: group.into(),
        partitions: None,
    })) else {
        panic!("wrong response")
    };
    response
        .offsets
        .into_iter()
        .map(|offset| (offset.topic, offset.partition, offset.offset))
        .collect()
}

/// Three members joining together get one generation with disjoint
/// assignments that cover all 12 partitions.
#[test]
fn three_members_share_twelve_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    broker.client().create_topic("twelve", 12);
    let addr = broker.addr;
    let members: Vec<JoinGroupResponse> = (0..3)
        .map(|_| std::thread::spawn(move || join(&mut Client::connect(addr), "g", "", &["twelve"])))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|handle| handle.join().expect("member thread"))
        .collect();
    let generation = members[0].generation;
    let mut seen = BTreeSet::new();
    for member in &members {
        assert_eq!(member.error, ErrorCode::None);
        assert_eq!(member.generation, generation, "one generation");
        assert_eq!(member.assignment.len(), 4, "range splits 12 evenly");
        for owned in &member.assignment {
            assert!(
                seen.insert((owned.topic.clone(), owned.partition)),
                "disjoint"
            );
        }
    }
    assert_eq!(seen.len(), 12, "every partition owned");
}

/// Stale generations, unknown members and groups, and commits for
/// partitions a member does not own are refused with their codes, and
/// nothing already committed changes.
#[test]
fn stale_and_foreign_commits_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("t", 2);
    client.create_topic("other", 1);
    let member = join(&mut client, "solo", "", &["t"]);
    assert_eq!(member.error, ErrorCode::None);
    assert_eq!(member.assignment.len(), 2);
    let (generation, id) = (member.generation, member.member_id.clone());
    let ok = commit(
        &mut client,
        "solo",
        generation,
        &id,
        &[("t", 0, 5), ("t", 1, 7)],
    );
    assert_eq!(ok.error, ErrorCode::None);
    let before = committed(&mut client, "solo");
    assert_eq!(before, vec![("t".into(), 0, 5), ("t".into(), 1, 7)]);
    let refusals = [
        (
            generation - 1,
            id.as_str(),
            ("t", 0, 99),
            ErrorCode::IllegalGeneration,
        ),
        (
            generation,
            "nobody",
            ("t", 0, 99),
            ErrorCode::UnknownMemberId,
        ),
        (
            generation,
            id.as_str(),
            ("other", 0, 99),
            ErrorCode::PartitionNotAssigned,
        ),
        (
            generation,
            id.as_str(),
            ("missing", 0, 99),
            ErrorCode::UnknownTopicOrPartition,
        ),
        (-1, "", ("t", 0, 99), ErrorCode::GroupNotEmpty),
    ];
    for (generation, member, offset, code) in refusals {
        let response = commit(
            &mut client,
            "solo",
            generation,
            member,
            &[("t", 1, 99), offset],
        );
        assert_eq!(response.error, code, "{member} {offset:?}");
        assert!(response.partitions.iter().all(|p| p.error == code));
    }
    assert_eq!(committed(&mut client, "solo"), before, "nothing changed");
    // Clients may read the offsets topic, not write or delete it.
    assert_eq!(
        client
            .produce("__consumer_offsets", 0, common::batch("forged", 1, 0), 1)
            .error,
        ErrorCode::InvalidTopic
    );
    let Response::DeleteTopics(deleted) = client.call(Request::DeleteTopics(DeleteTopicsRequest {
        names: vec!["__consumer_offsets".into()],
        timeout_ms: 1_000,
    })) else {
        panic!("wrong response")
    };
    assert_eq!(deleted.topics[0].error, ErrorCode::InvalidTopic);
    assert_eq!(committed(&mut client, "solo"), before, "nothing changed");
    assert_eq!(
        heartbeat(&mut client, "nope", 1, &id),
        ErrorCode::UnknownGroup
    );
    assert_eq!(
        heartbeat(&mut client, "solo", generation, "x"),
        ErrorCode::UnknownMemberId
    );
    assert_eq!(
        heartbeat(&mut client, "solo", generation + 1, &id),
        ErrorCode::IllegalGeneration
    );
    assert_eq!(
        heartbeat(&mut client, "solo", generation, &id),
        ErrorCode::None
    );
    let Response::DescribeGroup(description) =
        client.call(Request::DescribeGroup(DescribeGroupRequest {
            group: "unknown".into(),
        }))
    else {
        panic!("wrong response")
    };
    assert_eq!(description.error, ErrorCode::UnknownGroup);
    // A member that leaves empties the group: an admin may then commit.
    let Response::LeaveGroup(ack) = client.call(Request::LeaveGroup(LeaveGroupRequest {
        group: "solo".into(),
        member_id: id,
    })) else {
        panic!("wrong response")
    };
    assert_eq!(ack.error, ErrorCode::None);
    assert_eq!(
        commit(&mut client, "solo", -1, "", &[("t", 0, 1)]).error,
        ErrorCode::None
    );
}

/// A member that stops heartbeating loses its partitions to the others once
/// its session times out; committed offsets survive a kill -9 of the broker.
#[test]
fn expired_member_is_replaced_and_offsets_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    broker.client().create_topic("four", 4);
    let addr = broker.addr;
    let [first, second] = [0, 1].map(|_| {
        std::thread::spawn(move || join(&mut Client::connect(addr), "pair", "", &["four"]))
    });
    let mut first = first.join().expect("thread");
    let second = second.join().expect("thread");
    assert_eq!((first.assignment.len(), second.assignment.len()), (2, 2));
    // `second` goes silent; `first` keeps beating until told to rejoin.
    let mut client = broker.client();
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "the silent member expires");
        match heartbeat(&mut client, "pair", first.generation, &first.member_id) {
            ErrorCode::None => std::thread::sleep(Duration::from_millis(100)),
            ErrorCode::RebalanceInProgress => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    first = join(&mut client, "pair", &first.member_id.clone(), &["four"]);
    assert_eq!(first.error, ErrorCode::None);
    assert_eq!(first.assignment.len(), 4, "all partitions to the survivor");
    assert!(first.generation > second.generation);
    let stale = commit(
        &mut client,
        "pair",
        second.generation,
        &second.member_id,
        &[("four", 0, 1)],
    );
    assert_eq!(
        stale.error,
        ErrorCode::UnknownMemberId,
        "the expired member is fenced"
    );
    let offsets = [
        ("four", 0, 10),
        ("four", 1, 11),
        ("four", 2, 12),
        ("four", 3, 13),
    ];
    assert_eq!(
        commit(
            &mut client,
            "pair",
            first.generation,
            &first.member_id,
            &offsets
        )
        .error,
        ErrorCode::None
    );
    drop(client);
    broker.kill();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    let expected: Vec<(String, u32, i64)> = offsets
        .iter()
        .map(|(topic, partition, offset)| (topic.to_string(), *partition, *offset as i64))
        .collect();
    assert_eq!(committed(&mut client, "pair"), expected);
    // The old member id means nothing to the new broker run.
    assert_eq!(
        heartbeat(&mut client, "pair", first.generation, &first.member_id),
        ErrorCode::UnknownMemberId
    );
}

/// A graceful stop writes the offsets partitions' snapshots; offsets
/// committed after a restart land after the snapshot, and a kill -9 then
/// recovers both (snapshot plus replay of what follows it).
#[test]
fn offsets_snapshot_plus_replay_survive_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("snap", 2);
    assert_eq!(
        commit(&mut client, "keepers", -1, "", &[("snap", 0, 5)]).error,
        ErrorCode::None
    );
    drop(client);
    assert!(broker.terminate().success());
    let snapshots = (0..8)
        .filter(|index| {
            dir.path()
                .join(format!("__consumer_offsets-{index}"))
                .join("groups-snapshot.json")
                .exists()
        })
        .count();
    assert_eq!(snapshots, 8, "every offsets partition has its snapshot");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    assert_eq!(
        committed(&mut client, "keepers"),
        vec![("snap".into(), 0, 5)]
    );
    assert_eq!(
        commit(&mut client, "keepers", -1, "", &[("snap", 1, 9)]).error,
        ErrorCode::None
    );
    drop(client);
    broker.kill();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    assert_eq!(
        committed(&mut client, "keepers"),
        vec![("snap".into(), 0, 5), ("snap".into(), 1, 9)]
    );
}

fn join_static(
    client: &mut Client,
    group: &str,
    instance: &str,
    topics: &[&str],
) -> JoinGroupResponse {
    join_as(client, group, "", Some(instance), 30_000, topics)
}

fn list_groups(client: &mut Client) -> Vec<String> {
    let Response::ListGroups(response) = client.call(Request::ListGroups(ListGroupsRequest {}))
    else {
        panic!("wrong response")
    };
    response
        .groups
        .into_iter()
        .map(|group| group.group)
        .collect()
}

/// A static instance joining again takes over under a new member id with
/// the same generation and partitions, and the old id is fenced; a topic
/// created after the group subscribed to it triggers a rebalance that
/// assigns it; an empty commit is answered; a group with neither members
/// nor offsets disappears.
#[test]
fn static_takeover_new_topics_and_empty_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(dir.path(), &[]);
    let mut client = broker.client();
    client.create_topic("fixed", 2);
    let old = join_static(&mut client, "statics", "node-1", &["fixed"]);
    assert_eq!(old.error, ErrorCode::None);
    let new = join_static(&mut client, "statics", "node-1", &["fixed"]);
    assert_eq!(new.error, ErrorCode::None);
    assert_ne!(new.member_id, old.member_id, "a new id for the new process");
    assert_eq!(
        (new.generation, new.assignment.clone()),
        (old.generation, old.assignment.clone()),
        "no rebalance"
    );
    assert_eq!(
        heartbeat(&mut client, "statics", old.generation, &old.member_id),
        ErrorCode::FencedInstanceId
    );
    assert_eq!(
        commit(
            &mut client,
            "statics",
            old.generation,
            &old.member_id,
            &[("fixed", 0, 1)]
        )
        .error,
        ErrorCode::FencedInstanceId
    );
    assert_eq!(
        heartbeat(&mut client, "statics", new.generation, &new.member_id),
        ErrorCode::None
    );
    assert!(
        commit(&mut client, "statics", new.generation, &new.member_id, &[])
            .error
            .is_ok(),
        "an empty commit is answered"
    );

    let early = join(&mut client, "early", "", &["later"]);
    assert_eq!(early.error, ErrorCode::None);
    assert!(early.assignment.is_empty(), "nothing to assign yet");
    client.create_topic("later", 2);
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(
            Instant::now() < deadline,
            "the new topic triggers a rebalance"
        );
        match heartbeat(&mut client, "early", early.generation, &early.member_id) {
            ErrorCode::None => std::thread::sleep(Duration::from_millis(50)),
            ErrorCode::RebalanceInProgress => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let rejoined = join(&mut client, "early", &early.member_id, &["later"]);
    assert_eq!(rejoined.assignment.len(), 2);

    let brief = join(&mut client, "brief", "", &["fixed"]);
    let Response::LeaveGroup(ack) = client.call(Request::LeaveGroup(LeaveGroupRequest {
        group: "brief".into(),
        member_id: brief.member_id,
    })) else {
        panic!("wrong response")
    };
    assert_eq!(ack.error, ErrorCode::None);
    let deadline = Instant::now() + DEADLINE;
    while list_groups(&mut client).contains(&"brief".to_string()) {
        assert!(
            Instant::now() < deadline,
            "an empty group without offsets goes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// FindCoordinator tells clients the address they can reach: the bound
/// loopback address by default, and `advertised_listen` when it is set.
#[test]
fn find_coordinator_answers_with_the_advertised_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = BrokerProcess::start(&dir.path().join("plain"), &[]);
    let find =
        |client: &mut Client| match client.call(Request::FindCoordinator(FindCoordinatorRequest {
            group: "anyone".into(),
        })) {
            Response::FindCoordinator(response) => (response.host, response.port),
            other => panic!("unexpected {other:?}"),
        };
    assert_eq!(
        find(&mut broker.client()),
        ("127.0.0.1".to_string(), broker.addr.port())
    );

    let config = dir.path().join("weir.toml");
    std::fs::write(&config, "advertised_listen = \"weir-0.example:19092\"\n").expect("config");
    let advertised = BrokerProcess::start(
        &dir.path().join("advertised"),
        &["--config", config.to_str().expect("utf-8 path")],
    );
    assert_eq!(
        find(&mut advertised.client()),
        ("weir-0.example".to_string(), 19092)
    );
}
