"""Handlers for the tests: the seed guide's SequenceSum handler, verbatim
(the guide's ``tools/atp_demo.py``), plus a few misbehaving ones."""


def handler( taskStatus , input ) : 
    """ example ATP handler subroutine """
    sum = 0 
    # sum the values 
    for val in input : 
        try :
            sum += float( val ) 
        except ValueError: 
            # stop in case on ivalid input 
            taskStatus.setFailure("Input must be a sequence of numbers!") 
            return 
    # store the response and terminate 
    taskStatus.storeResponse( str(sum) )  


def boom(taskStatus, input):
    """A handler that raises."""
    raise ValueError("boom")


def pause_then_return(taskStatus, input):
    """Leaves the task PAUSED; the consumer's success-if-not-finished ends it."""
    taskStatus.setPaused("waiting for something")


class RaisesOnLoad:
    """Pickles fine; raises when unpickled (its __reduce__ calls a function
    that fails)."""

    def __reduce__(self):
        return (_explode, ("cannot rebuild this input",))


def _explode(text):
    raise RuntimeError(text)
