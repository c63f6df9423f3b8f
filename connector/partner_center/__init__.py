"""Microsoft Partner Center co-sell referrals: wire models, conversion, the client and its sandbox twin.

Wire facts: partner-center-api.md; public source of each guard:
https://learn.microsoft.com/partner-center/developer/referral-resources and the pages listed in §0.
"""
