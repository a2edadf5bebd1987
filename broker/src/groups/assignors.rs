//! Assignors: pure functions from members' subscriptions (and, for the
//! sticky one, the current owners) to each member's partitions.

use std::collections::{BTreeSet, HashMap};

/// Partitions (topic, index) per member id.
pub type Assignment = HashMap<String, Vec<(String, u32)>>;

/// An empty assignment for every member, and the topics anyone subscribes to.
fn assignment_frame(subscriptions: &[(String, Vec<String>)]) -> (Assignment, BTreeSet<&String>) {
    let out = subscriptions
        .iter()
        .map(|(member, _)| (member.clone(), Vec::new()))
        .collect();
    let topics = subscriptions
        .iter()
        .flat_map(|(_, topics)| topics.iter())
        .collect();
    (out, topics)
}

/// The members subscribed to `topic`, in member order.
fn subscribers_of<'a>(subscriptions: &'a [(String, Vec<String>)], topic: &str) -> Vec<&'a String> {
    subscriptions
        .iter()
        .filter(|(_, topics)| topics.iter().any(|t| t == topic))
        .map(|(member, _)| member)
        .collect()
}

/// Assigns the subscribed topics' partitions to members (`subscriptions`
/// sorted by member id). `range`: per topic, contiguous runs, the first
/// members one extra; `roundrobin`: all partitions in (topic, partition)
/// order dealt in turn to the members subscribed to each.
pub fn assign(
    assignor: &str,
    subscriptions: &[(String, Vec<String>)],
    partitions_of: impl Fn(&str) -> u32,
) -> HashMap<String, Vec<(String, u32)>> {
    let (mut out, topics) = assignment_frame(subscriptions);
    match assignor {
        "roundrobin" => {
            let mut turn = 0usize;
            for topic in topics {
                let subscribers = subscribers_of(subscriptions, topic);
                for partition in 0..partitions_of(topic) {
                    // Deal across all members, skipping those not subscribed.
                    let member = loop {
                        let candidate = &subscriptions[turn % subscriptions.len()].0;
                        turn += 1;
                        if subscribers.contains(&candidate) {
                            break candidate;
                        }
                    };
                    if let Some(owned) = out.get_mut(member) {
                        owned.push((topic.clone(), partition));
                    }
                }
            }
        }
        _ => {
            for topic in topics {
                let subscribers = subscribers_of(subscriptions, topic);
                let count = partitions_of(topic);
                let per_member = count / subscribers.len() as u32;
                let extra = count % subscribers.len() as u32;
                let mut next = 0;
                for (index, member) in subscribers.iter().enumerate() {
                    let take = per_member + u32::from((index as u32) < extra);
                    if let Some(owned) = out.get_mut(*member) {
                        owned.extend((next..next + take).map(|p| (topic.clone(), p)));
                    }
                    next += take;
                }
            }
        }
    }
    out
}

/// A balanced assignment (per topic, as even as `range`) that keeps each
/// partition with its current owner where the balance allows.
pub fn assign_sticky(
    subscriptions: &[(String, Vec<String>)],
    current: &HashMap<String, Vec<(String, u32)>>,
    partitions_of: impl Fn(&str) -> u32,
) -> HashMap<String, Vec<(String, u32)>> {
    let (mut out, topics) = assignment_frame(subscriptions);
    for topic in topics {
        let count = partitions_of(topic);
        let mut subscribers = subscribers_of(subscriptions, topic);
        let owned_here = |member: &String| {
            current.get(member).map_or(0, |owned| {
                owned
                    .iter()
                    .filter(|(t, p)| t == topic && *p < count)
                    .count()
            })
        };
        // The members owning most keep the one-extra quotas: fewer moves.
        subscribers.sort_by_cached_key(|member| {
            (std::cmp::Reverse(owned_here(member)), (*member).clone())
        });
        let base = count / subscribers.len() as u32;
        let extra = count % subscribers.len() as u32;
        let quota: HashMap<&String, u32> = subscribers
            .iter()
            .enumerate()
            .map(|(index, member)| (*member, base + u32::from((index as u32) < extra)))
            .collect();
        let mut taken = BTreeSet::new();
        for member in &subscribers {
            let mut kept = 0;
            for (t, partition) in current.get(*member).into_iter().flatten() {
                if t == topic
                    && *partition < count
                    && kept < quota[member]
                    && taken.insert(*partition)
                {
                    out.entry((*member).clone())
                        .or_default()
                        .push((topic.clone(), *partition));
                    kept += 1;
                }
            }
        }
        let mut free = (0..count).filter(|partition| !taken.contains(partition));
        for member in &subscribers {
            let have = out.get(*member).map_or(0, |owned| {
                owned.iter().filter(|(t, _)| t == topic).count() as u32
            });
            for _ in have..quota[member] {
                if let Some(partition) = free.next() {
                    out.entry((*member).clone())
                        .or_default()
                        .push((topic.clone(), partition));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(count: usize, topics: &[&str]) -> Vec<(String, Vec<String>)> {
        (0..count)
            .map(|index| {
                (
                    format!("m{index}"),
                    topics.iter().map(|topic| topic.to_string()).collect(),
                )
            })
            .collect()
    }

    /// Both assignors hand out every partition exactly once, evenly, only
    /// to subscribers.
    #[test]
    fn assignors_cover_every_partition_once() {
        for assignor in ["range", "roundrobin"] {
            let subscriptions = members(3, &["a", "b"]);
            let assignment = assign(
                assignor,
                &subscriptions,
                |topic| {
                    if topic == "a" { 12 } else { 5 }
                },
            );
            let mut all: Vec<(String, u32)> = assignment.values().flatten().cloned().collect();
            all.sort();
            let mut expected: Vec<(String, u32)> = (0..12)
                .map(|p| ("a".to_string(), p))
                .chain((0..5).map(|p| ("b".to_string(), p)))
                .collect();
            expected.sort();
            assert_eq!(all, expected, "{assignor}");
            let sizes: Vec<usize> = assignment.values().map(Vec::len).collect();
            assert!(
                sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 2,
                "{assignor}: {sizes:?}"
            );
        }
        let mixed = vec![
            ("m0".to_string(), vec!["a".to_string()]),
            ("m1".to_string(), vec!["b".to_string()]),
        ];
        for assignor in ["range", "roundrobin"] {
            let assignment = assign(assignor, &mixed, |_| 4);
            assert!(assignment["m0"].iter().all(|(topic, _)| topic == "a"));
            assert!(assignment["m1"].iter().all(|(topic, _)| topic == "b"));
            assert_eq!(assignment["m0"].len(), 4);
        }
    }

    /// The sticky assignor balances like range and moves as little as it
    /// can: a third member takes a third, the others keep the rest.
    #[test]
    fn sticky_keeps_what_it_can() {
        let two = members(2, &["t"]);
        let first = assign_sticky(&two, &HashMap::new(), |_| 12);
        assert_eq!(first["m0"].len() + first["m1"].len(), 12);
        let three = members(3, &["t"]);
        let second = assign_sticky(&three, &first, |_| 12);
        for member in ["m0", "m1"] {
            assert_eq!(second[member].len(), 4);
            assert!(
                second[member].iter().all(|p| first[member].contains(p)),
                "{member} keeps only what it had"
            );
        }
        assert_eq!(second["m2"].len(), 4);
        let mut all: Vec<(String, u32)> = second.values().flatten().cloned().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 12, "every partition once");
        // Mixed subscriptions, and a topic that shrank: only subscribers,
        // nothing beyond the count, every partition once.
        let mixed = vec![
            ("m0".to_string(), vec!["a".to_string(), "b".to_string()]),
            ("m1".to_string(), vec!["b".to_string()]),
        ];
        let before: HashMap<String, Vec<(String, u32)>> = HashMap::from([
            (
                "m0".to_string(),
                vec![("a".to_string(), 5), ("b".to_string(), 0)],
            ),
            (
                "m1".to_string(),
                vec![("b".to_string(), 1), ("b".to_string(), 7)],
            ),
        ]);
        let after = assign_sticky(&mixed, &before, |topic| if topic == "a" { 3 } else { 4 });
        assert!(after["m1"].iter().all(|(topic, _)| topic == "b"));
        let mut all: Vec<(String, u32)> = after.values().flatten().cloned().collect();
        all.sort();
        let expected: Vec<(String, u32)> = (0..3)
            .map(|p| ("a".to_string(), p))
            .chain((0..4).map(|p| ("b".to_string(), p)))
            .collect();
        assert_eq!(all, expected);
        assert!(after["m1"].contains(&("b".to_string(), 1)), "kept");
    }
}
