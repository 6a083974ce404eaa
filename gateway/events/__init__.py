"""Events told to webhook endpoints: signing, the address guard and the delivery worker.

The outbox itself (events written in the change's transaction) is the store's
(:mod:`gateway.storage.events`); what each management change tells is said in
:mod:`gateway.manage.events`.
"""
