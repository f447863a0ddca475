"""
Groups (tim's "rooms"): membership, roles, moderation, messages, profiles.

tim's rules are kept — a founder and managers; private groups need approval,
open groups are joined directly; a user can block a group and a group can
block a member — with these deliberate changes (see docs/groups.md):

  - kicking a member keeps that member's own block of the group;
  - a join request is acknowledged to the requester;
  - pulling someone into an open group requires being a member;
  - the founder can dissolve a group that still has members, who are told.

Extensions: ownership transfer, member caps, muting a member or everyone,
notices when members join or leave, recall by managers.

The modules: L{directory} (what a group is, cached), L{core} (what every
group operation shares), L{membership}, L{moderation}, L{messages},
L{profiles}.
"""
