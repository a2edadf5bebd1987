//! A consumer as a member of a group: subscribing, committing offsets,
//! following rebalances (eager and cooperative) and leaving the group.

use super::*;

impl Consumer {
    /// Joins `group` consuming `topics`, with [`GroupConfig`] defaults;
    /// partitions then come and go with the group's rebalances (replacing
    /// any assigned by hand).
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), weir_client::ClientError> {
    /// use weir_client::{Consumer, ConsumerConfig};
    /// let mut consumer = Consumer::connect("127.0.0.1:9092", ConsumerConfig::default()).await?;
    /// consumer.subscribe("billing", &["orders"]).await?;
    /// while let Some(record) = consumer.next().await {
    ///     let record = record?;
    ///     println!("{}@{}", record.partition, record.offset);
    ///     consumer.commit_sync().await?; // or leave it to auto-commit
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Broker errors from joining (e.g. `InvalidSessionTimeout`,
    /// `InconsistentAssignor`), connection errors.
    pub async fn subscribe(&mut self, group: &str, topics: &[&str]) -> Result<()> {
        self.subscribe_with(group, topics, GroupConfig::default(), None)
            .await
    }

    /// [`Consumer::subscribe`] with settings and a rebalance listener.
    ///
    /// # Errors
    /// As [`Consumer::subscribe`].
    pub async fn subscribe_with(
        &mut self,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
        listener: Option<Box<dyn RebalanceListener>>,
    ) -> Result<()> {
        self.ensure_connected().await?;
        self.close_group().await?;
        self.unassign_all().await?;
        let topics: Vec<String> = topics.iter().map(|topic| topic.to_string()).collect();
        // The group's coordinator (the leader of its offsets partition)
        // takes every group call; while it moves or loads, ask again.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.reconnect_timeout_ms);
        let mut backoff = Duration::from_millis(self.config.reconnect_backoff_ms.max(1));
        let (identity, assignment) = loop {
            let attempt = async {
                let coordinator = crate::group::find_coordinator(&self.router, group).await?;
                let joined = crate::group::join(&coordinator, group, &topics, &config, "").await?;
                Ok((coordinator, joined))
            };
            match attempt.await {
                Ok((coordinator, joined)) => {
                    self.connection = coordinator;
                    break joined;
                }
                Err(error)
                    if (crate::group::coordinator_moved(&error)
                        || crate::router::leader_moved(&error))
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(%error, group, "coordinator not ready; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(RECONNECT_BACKOFF_MS_MAX));
                }
                Err(error) => return Err(error),
            }
        };
        self.group = Some(crate::group::Membership::start(
            self.connection.clone(),
            group.to_string(),
            topics,
            config,
            identity,
            listener,
        ));
        self.take_assignment(assignment).await
    }

    /// Partitions owned now (hand-assigned or by the group).
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.assignments
            .iter()
            .map(|assignment| (assignment.topic.clone(), assignment.partition))
            .collect()
    }

    /// This member's id and generation in its group.
    pub fn group_generation(&self) -> Option<(String, i32)> {
        self.group.as_ref().map(|group| {
            let identity = group.identity();
            (identity.member_id, identity.generation)
        })
    }

    /// Commits the position of every owned partition in the background
    /// (errors are logged; use [`Consumer::commit_sync`] to see them).
    pub fn commit(&self) {
        let Some(group) = &self.group else {
            return;
        };
        let connection = self.connection.clone();
        let name = group.group.clone();
        let identity = group.identity();
        let offsets = self.positions();
        let order = group.commit_order.clone();
        tokio::spawn(async move {
            let _ordered = order.lock().await;
            if let Err(error) =
                crate::group::commit_offsets(&connection, &name, Some(&identity), &offsets).await
            {
                tracing::warn!(%error, group = name, "commit failed");
            }
        });
    }

    /// Commits the position of every owned partition and waits until it is
    /// durable.
    ///
    /// # Errors
    /// `InvalidArgument` without a group; `Broker(IllegalGeneration |
    /// RebalanceInProgress | UnknownMemberId)` when the group moved on (the
    /// next `next()` rejoins); connection errors.
    pub async fn commit_sync(&mut self) -> Result<()> {
        let offsets = self.positions();
        self.commit_offsets_sync(&offsets).await
    }

    /// Commits these offsets (topic, partition, next offset to consume).
    ///
    /// # Errors
    /// As [`Consumer::commit_sync`], and `Broker(PartitionNotAssigned)`.
    pub async fn commit_offsets_sync(&mut self, offsets: &[(String, u32, u64)]) -> Result<()> {
        self.require_group()?;
        loop {
            // Finding a moved coordinator again is bounded by the
            // reconnect timeout, as any reconnect.
            self.ensure_connected().await?;
            match self.commit_offsets_now(offsets).await {
                Err(error) if crate::group::coordinator_moved(&error) => continue,
                outcome => return outcome,
            }
        }
    }

    /// The coordinator said the group is no longer its own.
    pub(super) fn coordinator_lost(&self) -> bool {
        self.group.as_ref().is_some_and(|group| {
            group
                .coordinator_moved
                .load(std::sync::atomic::Ordering::Acquire)
        })
    }

    /// Finds the coordinator again before the next group call.
    pub(super) fn mark_coordinator_moved(&self) {
        if let Some(group) = &self.group {
            group
                .coordinator_moved
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    pub(super) fn require_group(&self) -> Result<()> {
        match self.group {
            Some(_) => Ok(()),
            None => Err(ClientError::InvalidArgument(
                "commit needs a group (subscribe first)".into(),
            )),
        }
    }

    /// [`Consumer::commit_offsets_sync`] on the connection as it is.
    pub(super) async fn commit_offsets_now(
        &mut self,
        offsets: &[(String, u32, u64)],
    ) -> Result<()> {
        let Some(group) = &mut self.group else {
            return Err(ClientError::InvalidArgument(
                "commit needs a group (subscribe first)".into(),
            ));
        };
        let identity = group.identity();
        let order = group.commit_order.clone();
        let _ordered = order.lock().await;
        let outcome =
            crate::group::commit_offsets(&self.connection, &group.group, Some(&identity), offsets)
                .await;
        if let Err(ClientError::Broker(
            ErrorCode::IllegalGeneration
            | ErrorCode::RebalanceInProgress
            | ErrorCode::UnknownMemberId,
        )) = &outcome
        {
            group
                .rejoin
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if let Err(error) = &outcome
            && crate::group::coordinator_moved(error)
        {
            group
                .coordinator_moved
                .store(true, std::sync::atomic::Ordering::Release);
        }
        if outcome.is_ok() {
            group.last_commit = tokio::time::Instant::now();
        }
        outcome
    }

    /// Leaves the group cleanly: commits (with auto-commit), leaves (a
    /// static member keeps its place until its session expires) and stops
    /// heartbeating. Dropping a consumer without it is a crash to the group:
    /// its partitions move after the session timeout.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn close(mut self) -> Result<()> {
        self.close_group().await
    }

    pub(super) async fn close_group(&mut self) -> Result<()> {
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        // What was read is committed, stale partitions included (read
        // before a reconnect); then the stale subscriptions go with the
        // group (nothing would ever resubscribe them).
        let offsets = self.positions();
        self.assignments.retain(|assignment| !assignment.stale);
        self.next_assignment = 0;
        group.heartbeat.abort();
        let identity = group.identity();
        if group.config.auto_commit
            && let Err(error) = crate::group::commit_offsets(
                &self.connection,
                &group.group,
                Some(&identity),
                &offsets,
            )
            .await
        {
            tracing::warn!(%error, group = group.group, "final commit failed");
        }
        if group.config.instance_id.is_none() && !identity.member_id.is_empty() {
            crate::group::leave(&self.connection, &group.group, &identity.member_id).await?;
        }
        Ok(())
    }

    /// (topic, partition, position) of every owned partition.
    pub(super) fn positions(&self) -> Vec<(String, u32, u64)> {
        self.assignments
            .iter()
            .map(|assignment| {
                (
                    assignment.topic.clone(),
                    assignment.partition,
                    assignment.position,
                )
            })
            .collect()
    }

    /// Rejoins when the heartbeat said so; commits when it is time.
    pub(super) async fn maintain_group(&mut self) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        // The flag is cleared only when the rebalance is done, so one cut
        // short (the caller dropped `next()`) is taken up again.
        if group.rebalancing() {
            return self.rebalance().await;
        }
        if group.auto_commit_due() {
            let positions = self.positions();
            match self.commit_offsets_now(&positions).await {
                Ok(()) => {}
                // The group moved on: the rebalance comes next.
                Err(ClientError::Broker(_)) => {
                    if let Some(group) = &mut self.group {
                        group.last_commit = tokio::time::Instant::now();
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Gives up every partition (committing first), rejoins, takes the new
    /// assignment.
    pub(super) async fn rebalance(&mut self) -> Result<()> {
        if self
            .group
            .as_ref()
            .is_some_and(|group| group.config.assignor == crate::group::COOPERATIVE_STICKY)
        {
            return self.rebalance_cooperatively().await;
        }
        let started = self
            .group
            .as_ref()
            .is_some_and(|group| group.pending_join.is_some() || group.joined.is_some());
        if !started {
            let owned = self.assignment();
            self.commit_before_revoking(&owned).await?;
            self.unassign_all().await?;
        }
        let connection = self.connection.clone();
        let Some(group) = &mut self.group else {
            return Ok(());
        };
        let (_, assignment) = match group.join_resumable(&connection).await {
            Ok(joined) => joined,
            Err(error) if crate::group::coordinator_moved(&error) => {
                // Not a failure of the membership: rejoin at the new
                // coordinator once it is found.
                self.mark_coordinator_moved();
                return Err(error);
            }
            Err(error) => return Err(self.abandon_membership(error).await),
        };
        self.take_assignment(assignment).await?;
        self.finish_rebalance(false);
        Ok(())
    }

    /// Before `partitions` are given up: the listener stages what it wants
    /// committed, auto-commit adds the positions it did not name, and all
    /// of it is committed. A group that already moved on refuses the commit;
    /// that is not an error here (nothing can be committed any more).
    pub(super) async fn commit_before_revoking(
        &mut self,
        partitions: &[(String, u32)],
    ) -> Result<()> {
        let mut commits = Vec::new();
        if let Some(group) = &mut self.group
            && let Some(listener) = &mut group.listener
        {
            listener
                .get_mut()
                .unwrap_or_else(|poison| poison.into_inner())
                .revoked(partitions, &mut commits);
        }
        let auto_commit = self
            .group
            .as_ref()
            .is_some_and(|group| group.config.auto_commit);
        if auto_commit {
            for (topic, partition, position) in self.positions() {
                let revoking = partitions
                    .iter()
                    .any(|(t, p)| *t == topic && *p == partition);
                let staged = commits
                    .iter()
                    .any(|(t, p, _)| *t == topic && *p == partition);
                if revoking && !staged {
                    commits.push((topic, partition, position));
                }
            }
        }
        match self.commit_offsets_now(&commits).await {
            Ok(()) | Err(ClientError::Broker(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Marks a rebalance applied; `again` asks for another one right away.
    pub(super) fn finish_rebalance(&mut self, again: bool) {
        if let Some(group) = &mut self.group {
            group.joined = None;
            group.reattached = false;
            // Heartbeats answered during the join spoke of the old
            // generation: the join just dealt with what they asked for.
            group
                .rejoin
                .store(again, std::sync::atomic::Ordering::Release);
            if again {
                group.wake.notify_waiters();
            }
        }
    }

    /// A join failed: nothing assigned can be trusted to be ours any more.
    pub(super) async fn abandon_membership(&mut self, error: ClientError) -> ClientError {
        let _ = self.unassign_all().await;
        if let Some(group) = &mut self.group {
            group.joined = None;
            group.pending_join = None;
        }
        if matches!(error, ClientError::Broker(ErrorCode::FencedInstanceId)) {
            // A newer process of this instance owns the membership now;
            // whatever `unassign_all` could not let go of goes too.
            self.group = None;
            self.assignments.clear();
            self.next_assignment = 0;
        }
        error
    }

    /// Cooperative: keep reading everything while rejoining; afterwards
    /// give up only what the new assignment leaves out (committing it
    /// first) and start what it adds. Giving something up means the group
    /// has a second round to hand it over: rejoin right away for it.
    pub(super) async fn rebalance_cooperatively(&mut self) -> Result<()> {
        let auto_commit = self
            .group
            .as_ref()
            .is_some_and(|group| group.config.auto_commit);
        let started = self
            .group
            .as_ref()
            .is_some_and(|group| group.pending_join.is_some() || group.joined.is_some());
        let reattached = self.group.as_ref().is_some_and(|group| group.reattached);
        if reattached && !started {
            // Back from a lost connection, everything held is given up, as
            // an eager member would: the listener hears of it and may
            // commit, under the old identity (refused if the group moved
            // on meanwhile, so an offset never goes back).
            let owned = self.assignment();
            self.commit_before_revoking(&owned).await?;
        } else if auto_commit && !started {
            let positions = self.positions();
            if let Err(error) = self.commit_offsets_now(&positions).await
                && !matches!(error, ClientError::Broker(_))
            {
                return Err(error);
            }
        }
        let connection = self.connection.clone();
        let Some(group) = &mut self.group else {
            return Ok(());
        };
        let member_before = group.identity().member_id;
        let (identity, assignment) = match group.join_resumable(&connection).await {
            Ok(joined) => joined,
            Err(error) if crate::group::coordinator_moved(&error) => {
                // Not a failure of the membership: rejoin at the new
                // coordinator once it is found.
                self.mark_coordinator_moved();
                return Err(error);
            }
            Err(error) => return Err(self.abandon_membership(error).await),
        };
        if member_before.is_empty() || identity.member_id != member_before || reattached {
            // Rejoined as a new member (expired, or the coordinator
            // restarted): what this consumer held may have been read and
            // committed by others since; start everything afresh from the
            // committed offsets. So too after a reconnect, which left what
            // it held unsubscribed.
            self.unassign_all().await?;
            self.take_assignment(assignment).await?;
            self.finish_rebalance(false);
            return Ok(());
        }
        let owned = self.assignment();
        let revoked: Vec<(String, u32)> = owned
            .iter()
            .filter(|partition| !assignment.contains(partition))
            .cloned()
            .collect();
        let added: Vec<(String, u32)> = assignment
            .iter()
            .filter(|partition| !owned.contains(partition))
            .cloned()
            .collect();
        if !revoked.is_empty() {
            // The coordinator still accepts commits for partitions being
            // handed over, in the new generation.
            self.commit_before_revoking(&revoked).await?;
            for (topic, partition) in &revoked {
                self.unassign(topic, *partition).await?;
            }
        }
        self.take_assignment(added).await?;
        // Giving something up means a second round hands it over: rejoin
        // right away for it.
        self.finish_rebalance(!revoked.is_empty());
        Ok(())
    }

    /// Starts reading `assignment` at the committed offsets.
    pub(super) async fn take_assignment(&mut self, assignment: Vec<(String, u32)>) -> Result<()> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let name = group.group.clone();
        let reset = group.config.reset;
        let committed =
            crate::group::fetch_offsets(&self.connection, &name, Some(&assignment)).await?;
        for (topic, partition, offset) in committed {
            let start = if offset >= 0 {
                Offset::At(offset as u64)
            } else {
                reset
            };
            match self.assign_now(&topic, partition, start).await {
                Ok(()) => {}
                // Deleted since the assignment: the coordinator rebalances
                // on its own when it notices; read the rest meanwhile.
                Err(ClientError::UnknownTopic(_)) => {}
                // Committed past the end after a truncation, or before a
                // retention cut: start where the reset says.
                Err(ClientError::Broker(ErrorCode::OffsetOutOfRange)) => {
                    self.assign_now(&topic, partition, reset).await?;
                }
                Err(error) => return Err(error),
            }
        }
        if let Some(group) = &mut self.group {
            group.last_commit = tokio::time::Instant::now();
            if let Some(listener) = &mut group.listener {
                listener
                    .get_mut()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .assigned(&assignment);
            }
        }
        Ok(())
    }

    pub(super) async fn unassign_all(&mut self) -> Result<()> {
        for (topic, partition) in self.assignment() {
            self.unassign(&topic, partition).await?;
        }
        Ok(())
    }
}
